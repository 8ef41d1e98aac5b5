"""The integer-dot GEMV: y = x @ W.T for a few rows of 16-bit x, with x quantised to int8 per 32 columns and the
weights' quant codes multiplied by it four at a time (sm_61+ `dp4a`), as llama.cpp's MMVQ kernels do.

Why: at batch 1 a 4-bit weight must be consumed at ~36 weights per SM per clock to keep up with the H200's memory,
which leaves ~3.5 instructions per weight. Decoding every code to float and multiplying (braid_kernels/quant_gemv.py)
takes ~12; here one 32-bit word of a block holds four codes (8 for 4-bit types: low and high nibbles), two masks
make them four int8 lanes and one dp4a multiplies them by four int8 x values: ~0.5 instructions per weight in the
inner loop, ~4.4 per weight with the scales, x and the reductions (sm_90 SASS of the Q4_K kernel at 1 row).
Measured on an H200 in the planes layout (benchmarks/quant_kernels.py; 6144x4096 to 128256x4096), against bf16
matmul at 1 row: Q4_K 1.70-2.66x, Q6_K 1.36-2.37x, Q8_0 1.64-1.95x; at 4 rows 0.75-0.97x (benchmarks/RESULTS.md).

The cost is x's rounding: x is split into runs of 32 columns, each stored as 127 levels of its largest magnitude
(int8_rows.py), so a product carries ~0.2% of that magnitude of error, a few times bf16's own rounding of x;
float32 x therefore keeps the float GEMV. Per group of codes c with weight = a * c + b:

    sum_i w_i x_i  ~  a * dx * sum_i c_i q_i + b * dx * sum_i q_i     (q_i = round(x_i / dx), dx = max|x| / 127)

with the integer sums exact: the result is W @ (q * dx) up to float32 rounding (llama.cpp's q8_1 activations).
Code words per type (each word = 4 weights of a group's low run and 4 of its high run; `lo` / `hi` as in
braid_kernels/quant_decode.py):

    Q8_0  qs word j (lo) and j + 4 (hi), signed codes            a = d, b = 0
    Q4_0  nibbles of qs word j                                    a = d, b = -8 d
    Q4_1  nibbles of qs word j                                    a = d, b = m
    Q5_0  nibbles of qs word j, bit 4 from qh >> 4j, >> 16 + 4j   a = d, b = -16 d
    Q5_1  as Q5_0                                                 a = d, b = m
    Q4_K  nibbles of qs[32c + 4j ...]                             a = d sc, b = -dmin m  (sub-blocks 2c, 2c + 1)
    Q5_K  as Q4_K, bit 4 from qh[4j ...] >> (2c, 2c + 1)          a = d sc, b = -dmin m
    Q6_K  nibbles of ql, bits 4-5 from qh >> 2 (t // 2)           a = d sc, b = -32 d sc

The weights are read in the planes layout (braid_kernels/quant_planes.py), where each quant field of a row's blocks
is one contiguous run: words load directly (16-byte vectors where row_bytes is a multiple of 16), or are assembled
from two 16-bit loads in rows whose length is not a multiple of 4 bytes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .int8_rows import Int8Rows, quantize_rows
from .numerics import INTERPRETED, pdl_options, wait_for_inputs
from .quant_decode import GROUP_LANES, GROUPS_PER_BLOCK, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q8_0, QTYPE_IDS, \
    _fp16, block_fields, k_group_scales, q6_group
from .quant_formats import BLOCK_SIZE, TYPE_SIZE
from .quant_gemv import QuantGemvConfig, add_slices, launch_config, slice_outputs, split_steps, store_rows

ONE_WARP_Q6_K_ROWS = 8192
"""At one row of x, Q6_K matrices of more rows than this take one warp per program, smaller ones four: on an H100,
4096x14336 (a down projection) 20.4 us on 4 warps against 24.5 on one, 1024x4096 (a v projection) 3.1 against 3.5,
128256x4096 (an lm_head) 140.5 against 141.5; on an H200 one warp was 11-14% faster on 28672x4096 and 128256x4096."""


def dot_launch_config(qtype: str, num_rows: int, n: int, num_sms: int, k: int | None = None) -> QuantGemvConfig:
    """The float GEMV's configuration (quant_gemv.launch_config: rows of W per program, K split for narrow N) with
    one row of W per program at one row of x, and steps of at least 2048 weights up to 4 rows of x (unless K is
    split); 4 warps, except one warp for the 256-weight K-types at one row of x.

    Swept on an H200 in the planes layout (benchmarks/RESULTS.md; 1-2 rows of W per program, 1, 2 or 4 warps, steps of
    2048-4096 weights at one row of x; 1-4 rows of W at four): at one row of x, one row of W per program was best for
    every type and shape; one warp was best or within 2% for Q4_K and gave Q6_K's 28672x4096 and 128256x4096 products
    11-14% over 4 warps (9% under on 4096x14336; so Q6_K matrices of at most ONE_WARP_Q6_K_ROWS rows take 4 warps);
    Q8_0 was within 3% on 1 or 4 warps. At four rows, four rows of W with steps of 1024-2048 were best. Q5_K, Q4_0,
    Q4_1, Q5_0 and Q5_1 were not swept."""
    config = launch_config(qtype, num_rows, n, num_sms, k)._replace(num_warps=4)
    if num_rows == 1:
        one_warp = BLOCK_SIZE[qtype] == 256 and (qtype != "Q6_K" or n > ONE_WARP_Q6_K_ROWS)
        config = config._replace(block_n=1, num_warps=1 if one_warp else 4)
    if num_rows <= 4 and config.split_k == 1:
        config = config._replace(block_k=max(config.block_k, 2048))
    return config


def launch_dot_gemv(x: torch.Tensor | Int8Rows, blocks: torch.Tensor, qtype: str, bias: torch.Tensor | None,
                    out: torch.Tensor, config: QuantGemvConfig) -> None:
    """out [M, N] = x [M, K] @ W.T (+ bias), W as GGML blocks [N, row_bytes], x rounded to int8 per 32 columns
    (here, or already: Int8Rows); arguments checked by the caller. config: as the float GEMV's (block_n rows of W
    per program, block_k columns per step, split_k slices)."""
    (num_rows, k), n = x.shape, blocks.shape[0]
    if num_rows == 0 or n == 0:
        return
    q, dx, sx, _ = x if isinstance(x, Int8Rows) else quantize_rows(x)
    steps = split_steps(qtype, k, config)
    partial = slice_outputs(out, steps.split_k)
    _dot_gemv_kernel[(triton.cdiv(n, config.block_n), steps.split_k)](
        q, dx, sx, blocks, bias, partial, num_rows, n, k, blocks.shape[1],
        QTYPE=QTYPE_IDS[qtype], BLOCK_SIZE=BLOCK_SIZE[qtype], TYPE_SIZE=TYPE_SIZE[qtype],
        GROUPS=GROUPS_PER_BLOCK[qtype], WORDS=GROUP_LANES[qtype] // 4, ALIGNED=blocks.shape[1] % 4 == 0,
        NUM_GROUPS=steps.num_groups, SPLIT_GROUPS=steps.split_groups, HAS_BIAS=bias is not None and steps.split_k == 1,
        BLOCK_M=triton.next_power_of_2(num_rows), BLOCK_N=config.block_n, BLOCK_G=steps.block_g,
        num_warps=config.num_warps, **pdl_options(blocks),
    )
    if steps.split_k > 1:
        add_slices(partial, bias, out)


@triton.jit
def _dp4a(a, b):
    """Sum of the four products of the signed bytes of int32 a and b (int32)."""
    if INTERPRETED:
        s = ((a << 24) >> 24) * ((b << 24) >> 24)
        s += ((a << 16) >> 24) * ((b << 16) >> 24)
        s += ((a << 8) >> 24) * ((b << 8) >> 24)
        return s + (a >> 24) * (b >> 24)
    else:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, 0;", "=r,r,r", [a, b], dtype=tl.int32,
                                         is_pure=True, pack=1)


@triton.jit
def _word(ptr, j, mask, ALIGNED: tl.constexpr):
    """The little-endian int32s at byte pointer ptr + 4 j (4-aligned if ALIGNED, else 2-aligned). The word index is
    added after the cast, so that Triton sees consecutive j as contiguous words (16-byte vector loads)."""
    if ALIGNED:
        return tl.load(ptr.to(tl.pointer_type(tl.int32)) + j, mask=mask, other=0)
    else:
        p16 = ptr.to(tl.pointer_type(tl.uint16)) + 2 * j
        lo = tl.load(p16, mask=mask, other=0).to(tl.int32)
        hi = tl.load(p16 + 1, mask=mask, other=0).to(tl.int32)
        return lo | (hi << 16)


@triton.jit
def _spread_bits(bits):
    """The low four bits of int32 `bits` as bit 4 of each of a word's four bytes (bit i -> bit 8 i + 4)."""
    return ((bits << 4) & 0x10) | ((bits << 11) & 0x1000) | ((bits << 18) & 0x100000) | ((bits << 25) & 0x10000000)


@triton.jit
def _decode_words(blocks_ptr, row_offset, nb, g, j, mask, QTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  GROUPS: tl.constexpr, ALIGNED: tl.constexpr):
    """Code words of groups g, words j (broadcastable index tensors) of the rows at byte row_offset, nb blocks per
    row, in the planes layout (quant_planes.py).

    Returns (c_lo, c_hi, a_lo, b_lo, a_hi, b_hi, col_lo, col_hi): int32 words of four int8 codes each for the
    group's low and high runs; the affine maps weight = a * code + b (float32, no j dimension); and the columns of
    each run's first weight (col + 4 j are the word's columns). Masked groups give zeros.
    """
    blk = g // GROUPS
    c = g % GROUPS
    qs, qh_ptr, scales, head = block_fields(blocks_ptr + row_offset, blk, nb, QTYPE)
    col = blk * BLOCK_SIZE
    if QTYPE == Q8_0:
        d = _fp16(head, mask)
        zero = d * 0.0
        return _word(qs, j, mask, ALIGNED), _word(qs + 16, j, mask, ALIGNED), d, zero, d, zero, col, col + 16
    elif QTYPE == Q4_0 or QTYPE == Q4_1:
        d = _fp16(head, mask)
        w = _word(qs, j, mask, ALIGNED)
        if QTYPE == Q4_0:
            b = -8.0 * d
        else:
            b = _fp16(head + 2, mask)
        return w & 0x0F0F0F0F, (w >> 4) & 0x0F0F0F0F, d, b, d, b, col, col + 16
    elif QTYPE == Q5_0 or QTYPE == Q5_1:
        d = _fp16(head, mask)
        w = _word(qs, j, mask, ALIGNED)
        qh = _word(qh_ptr, j * 0, mask, ALIGNED)  # bit i is bit 4 of weight i
        if QTYPE == Q5_0:
            b = -16.0 * d
        else:
            b = _fp16(head + 2, mask)
        c_lo = (w & 0x0F0F0F0F) | _spread_bits(qh >> (4 * j))
        c_hi = ((w >> 4) & 0x0F0F0F0F) | _spread_bits(qh >> (16 + 4 * j))
        return c_lo, c_hi, d, b, d, b, col, col + 16
    elif QTYPE == Q4_K or QTYPE == Q5_K:
        s_lo, m_lo, s_hi, m_hi = k_group_scales(head, scales, c, mask)
        w = _word(qs + c * 32, j, mask, ALIGNED)
        if QTYPE == Q4_K:
            c_lo = w & 0x0F0F0F0F
            c_hi = (w >> 4) & 0x0F0F0F0F
        else:
            qh = _word(qh_ptr, j, mask, ALIGNED)  # bit s of qh[i] is bit 4 of sub-block s's weight i
            c_lo = (w & 0x0F0F0F0F) | (((qh >> (2 * c)) & 0x01010101) << 4)
            c_hi = ((w >> 4) & 0x0F0F0F0F) | (((qh >> (2 * c + 1)) & 0x01010101) << 4)
        col_lo = col + c * 64
        return c_lo, c_hi, s_lo, -m_lo, s_hi, -m_hi, col_lo, col_lo + 32
    else:  # Q6_K: group c = (half h, quarter t), as in decode_groups
        a_lo, a_hi, ql_ptr, qh_run, shift, first = q6_group(qs, qh_ptr, scales, head, c, mask)
        ql = _word(ql_ptr, j, mask, ALIGNED)
        qh = _word(qh_run, j, mask, ALIGNED) >> shift
        c_lo = (ql & 0x0F0F0F0F) | ((qh & 0x03030303) << 4)
        c_hi = ((ql >> 4) & 0x0F0F0F0F) | (((qh >> 4) & 0x03030303) << 4)
        col_lo = col + first
        return c_lo, c_hi, a_lo, -32.0 * a_lo, a_hi, -32.0 * a_hi, col_lo, col_lo + 64


@triton.jit
def _dot_gemv_kernel(
    q_ptr, dx_ptr, sx_ptr, blocks_ptr, bias_ptr, out_ptr, M, N, K, row_bytes,
    QTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr, TYPE_SIZE: tl.constexpr, GROUPS: tl.constexpr,
    WORDS: tl.constexpr, ALIGNED: tl.constexpr, NUM_GROUPS: tl.constexpr, SPLIT_GROUPS: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (n, s): out[:, n * BLOCK_N : (n + 1) * BLOCK_N] over groups [s * SPLIT_GROUPS, (s + 1) *
    SPLIT_GROUPS) of K (out is float32 [slices, M, N] with several slices). Tiles (row of x, row of W, group, word)."""
    wait_for_inputs(PDL)
    pid = tl.program_id(0)
    g_start = tl.program_id(1) * SPLIT_GROUPS
    out_ptr += tl.program_id(1) * M * N
    rows = tl.arange(0, BLOCK_M)[:, None, None, None]
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)[None, :, None, None]
    j = tl.arange(0, WORDS)[None, None, None, :]
    row_ok, col_ok = rows < M, cols < N
    row_offset = cols.to(tl.int64) * row_bytes
    nb = row_bytes // TYPE_SIZE
    q_row = q_ptr.to(tl.pointer_type(tl.int32)) + rows * (K // 4)  # x's int8 codes as words
    s_row = rows * (K // 32)

    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_G, 1], tl.float32)
    for g0 in range(g_start, tl.minimum(g_start + SPLIT_GROUPS, NUM_GROUPS), BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)[None, None, :, None]
        g_ok = g < NUM_GROUPS
        c_lo, c_hi, a_lo, b_lo, a_hi, b_hi, col_lo, col_hi = _decode_words(
            blocks_ptr, row_offset, nb, g, j, col_ok & g_ok, QTYPE, BLOCK_SIZE, GROUPS, ALIGNED)
        x_ok = row_ok & g_ok
        x_lo = tl.load(q_row + col_lo // 4 + j, mask=x_ok, other=0)
        x_hi = tl.load(q_row + col_hi // 4 + j, mask=x_ok, other=0)
        dot_lo = tl.sum(_dp4a(c_lo, x_lo), axis=3, keep_dims=True).to(tl.float32)
        dot_hi = tl.sum(_dp4a(c_hi, x_hi), axis=3, keep_dims=True).to(tl.float32)
        dx_lo = tl.load(dx_ptr + s_row + col_lo // 32, mask=x_ok, other=0.0)
        dx_hi = tl.load(dx_ptr + s_row + col_hi // 32, mask=x_ok, other=0.0)
        sx_lo = tl.load(sx_ptr + 2 * s_row + col_lo // 16, mask=x_ok, other=0.0)
        sx_hi = tl.load(sx_ptr + 2 * s_row + col_hi // 16, mask=x_ok, other=0.0)
        if WORDS == 8:  # runs of 32 columns: both halves
            sx_lo += tl.load(sx_ptr + 2 * s_row + col_lo // 16 + 1, mask=x_ok, other=0.0)
            sx_hi += tl.load(sx_ptr + 2 * s_row + col_hi // 16 + 1, mask=x_ok, other=0.0)
        acc += a_lo * (dx_lo * dot_lo) + b_lo * sx_lo + a_hi * (dx_hi * dot_hi) + b_hi * sx_hi

    store_rows(tl.sum(tl.sum(acc, axis=3), axis=2), bias_ptr, out_ptr, pid, M, N, HAS_BIAS, BLOCK_M, BLOCK_N)
