"""GGML blocks in column order: the layout, the GEMV that streams it and its dequantiser.

quant_dot / quant_gemv read W [N, K] row by row as the GGUF file stores it: a program owns a few rows, its threads
split each row's K and sum their products across threads, and x is re-quantised (dot) or re-decoded per program.
Here the blocks are stored transposed at 32-bit-word granularity (`pack_columns`):

    words[b * WORDS + w, n] = word w of block b of W's row n        (int32 [K / BLOCK * WORDS, N])

so a warp reads word w of 128 neighbouring rows of W as one 512-byte run of 16-byte vectors, and each thread owns
4 rows of W (the output's columns; "columns" below) and sums all of its K slice in its own registers: no
cross-thread reduction, no x-quantising launch, perfectly coalesced loads. Only K is split across programs (to
fill the GPU when N is narrow); their float32 partial sums are added by a second, small kernel.

Words per block; a block's bytes are GGUF's, with two padding bytes where the block is not whole words:

    Q8_0  9 words / 32:   d fp16, 2 padding bytes | qs int8[32]
    Q4_K 36 words / 256:  d, dmin fp16 | scales[12] | qs[128]
    Q6_K 53 words / 256:  ql[128] | qh[64] | scales int8[16] | d fp16, 2 padding bytes

Memory: Q8_0 9 / 8.5 of its GGUF size, Q4_K and Q6_K (Q4_K_M's types) 1.000 / 1.010. Other types keep the row
layout (braid_kernels/quant.py).

Status: not used by the engine. Measured on an H200 (`python benchmarks/quant_kernels.py --columns --columns-sweep
--qtypes Q4_K --rows 1,4 --shapes 4096x4096,28672x4096,4096x14336`), against bf16 matmul and the row layout's
integer-dot GEMV (quant_dot) in the same run, Q4_K at 1 row: 4096x4096 12.7 us (bf16 13.2, rows 10.9), 28672x4096
44.0 us (58.6, 45.9; 1,500 GB/s), 4096x14336 27.6 us (33.9, 28.3), at the best configuration (1 warp, 4 columns per
thread, 16-32 slices); no faster than the row layout. 8 columns per thread: 1.6-1.9x slower; a variant spreading a
block's 4 groups over a program's 4 warps (tried and removed) 1.5-2x slower; 4 rows of x 7-10x slower (the static
loop over rows re-decodes every code per row); Q6_K and Q8_0 (8 columns per thread) 2.5-5x slower than at 1 row by
the row layout. The instruction count does not explain it (sm_90
SASS, Q4_K at 1 row: 4.3-5.0 instructions per weight, ~2.3 us of issue for 4096x4096): one-warp programs of one
step each leave 4-8 warps per multiprocessor, each a chain of dependent loads and sums. Kept as a tested starting
point for a layout that streams, not a path.

The arithmetic: a code q of B bits becomes f = 1 + q / 2^B by placing it in the mantissa of 1.0 (one shift and one
and-or per weight, no int-to-float conversion), and a group sharing one scale a and offset b sums as
a * sum(f x) + b * sum(x): one multiply-add per weight and row of x. The sums differ from gguf's dequantised
float32 matmul only in the order of float32 additions.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._checks import check_devices, check_float_dtype, check_linear_inputs, check_tensor
from .numerics import INTERPRETED, round_to_dtype
from .quant_decode import fp16_bits
from .quant_formats import BLOCK_SIZE, TYPE_SIZE
from .quant_gemv import add_slices, slice_outputs

WORDS = {"Q8_0": 9, "Q4_K": 36, "Q6_K": 53}
"""32-bit words per block in the column layout, by GGML type; the types the layout holds."""
COLUMN_QTYPES = frozenset(WORDS)
STEP = 256  # weights of a row per kernel step: one Q4_K / Q6_K block, eight Q8_0 blocks
MAX_ROWS = 8  # rows of x per GEMV launch
_IDS = {"Q8_0": 0, "Q4_K": 1, "Q6_K": 2}
Q8_0, Q4_K, Q6_K = (tl.constexpr(i) for i in range(3))


def pack_columns(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """uint8 GGUF blocks [N, row_bytes] of a COLUMN_QTYPES type -> int32 words [row_bytes / TYPE_SIZE * WORDS, N]
    (module docstring), on blocks' device."""
    if qtype not in COLUMN_QTYPES:
        raise ValueError(f"qtype must be one of {', '.join(sorted(COLUMN_QTYPES))} for the column layout, got "
                         f"{qtype!r}")
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] % TYPE_SIZE[qtype]:
        raise ValueError(f"blocks must be uint8 [rows, a multiple of {TYPE_SIZE[qtype]} bytes] for {qtype}, got "
                         f"{str(blocks.dtype).removeprefix('torch.')} {tuple(blocks.shape)}")
    n, row_bytes = blocks.shape
    b = blocks.reshape(n, row_bytes // TYPE_SIZE[qtype], TYPE_SIZE[qtype])
    pad = b.new_zeros(b.shape[:2] + (2,))
    if qtype == "Q8_0":
        b = torch.cat((b[..., :2], pad, b[..., 2:]), dim=-1)
    elif qtype == "Q6_K":
        b = torch.cat((b, pad), dim=-1)
    words = b.contiguous().view(torch.int32)  # little-endian: byte 0 of a block is its first word's low byte
    return words.reshape(n, -1).t().contiguous()


def num_columns_k(words: torch.Tensor, qtype: str) -> int:
    """K (weights per row of W) of column-layout words."""
    return words.shape[0] // WORDS[qtype] * BLOCK_SIZE[qtype]


def unpack_columns(words: torch.Tensor, qtype: str) -> torch.Tensor:
    """pack_columns' inverse: int32 words [K / BLOCK * WORDS, N] -> uint8 GGUF blocks [N, row_bytes]."""
    n = words.shape[1]
    b = words.t().contiguous().view(torch.uint8).reshape(n, -1, 4 * WORDS[qtype])
    if qtype == "Q8_0":
        b = torch.cat((b[..., :2], b[..., 4:]), dim=-1)
    elif qtype == "Q6_K":
        b = b[..., :TYPE_SIZE[qtype]]
    return b.reshape(n, -1).contiguous()


def columns_linear(x: torch.Tensor, words: torch.Tensor, qtype: str, bias: torch.Tensor | None = None,
                   config: ColumnsConfig | None = None) -> torch.Tensor:
    """x @ W.T + bias with W [N, K] held as column-layout words (pack_columns), as F.linear on the dequantised W.

    x: [M, K] float32/float16/bfloat16, unit stride along K; words: int32 [K / BLOCK_SIZE * WORDS, N] contiguous;
    bias: [N] of x's dtype or None. M <= MAX_ROWS: the column GEMV (float32 sums of the exact weights); larger M:
    W.T dequantised to x's dtype into a buffer, then a cuBLAS matmul. Returns a new [M, N] tensor of x's dtype.
    """
    _check_words(words, qtype)
    check_linear_inputs(_columns_gemv_kernel, x, num_columns_k(words, qtype), words.shape[1], bias, "words", words,
                        f"{qtype} words of shape {tuple(words.shape)}")
    if x.shape[0] > MAX_ROWS:
        y = torch.matmul(x, dequantize_columns(words, qtype, x.dtype))
        return y if bias is None else y + bias
    out = torch.empty((x.shape[0], words.shape[1]), dtype=x.dtype, device=x.device)
    launch_columns_gemv(x, words, qtype, bias, out, config)
    return out


def dequantize_columns(words: torch.Tensor, qtype: str, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W.T [K, N] of column-layout words: gguf's float32 weights rounded to out_dtype (float32/float16/bfloat16)."""
    _check_words(words, qtype)
    check_float_dtype("out_dtype", out_dtype)
    check_devices(_dequantize_columns_kernel, words=words)
    out = torch.empty((num_columns_k(words, qtype), words.shape[1]), dtype=out_dtype, device=words.device)
    launch_dequantize_columns(words, qtype, out)
    return out


def _check_words(words: torch.Tensor, qtype: str) -> None:
    if qtype not in COLUMN_QTYPES:
        raise ValueError(f"qtype must be one of {', '.join(sorted(COLUMN_QTYPES))}, got {qtype!r}")
    check_tensor("words", words, (torch.int32,), ndim=2)
    if words.shape[0] % WORDS[qtype] or not words.is_contiguous():
        raise ValueError(f"words must be contiguous int32 [a multiple of {WORDS[qtype]}, N] for {qtype}, got shape "
                         f"{tuple(words.shape)}, strides {words.stride()}")


class ColumnsConfig(NamedTuple):
    """A launch configuration: warps per program, the number of slices K is split into (each program sums one
    slice of whole 256-weight steps) and columns of W per thread (4: one 16-byte load per word; 8: two, which
    halves the per-thread cost of x, the same for all columns, but holds twice the registers)."""

    num_warps: int
    split_k: int
    columns_per_thread: int = 4

    @property
    def block_n(self) -> int:
        return 32 * self.columns_per_thread * self.num_warps


def launch_config(num_rows: int, n: int, k: int, num_sms: int) -> ColumnsConfig:
    """1 warp per program, 8 columns per thread up to 2 rows of x (4 above: 8 spill registers at 4 rows, by
    ptxas' report for sm_90), and K split into as many slices as it takes for ~8 warps per multiprocessor (at
    least one 256-weight step each)."""
    per_thread = 8 if num_rows <= 2 else 4
    tiles = triton.cdiv(n, 32 * per_thread)
    steps = triton.cdiv(k, STEP)
    return ColumnsConfig(1, max(1, min(steps, triton.cdiv(8 * num_sms, tiles))), per_thread)


def launch_columns_gemv(x: torch.Tensor, words: torch.Tensor, qtype: str, bias: torch.Tensor | None,
                        out: torch.Tensor, config: ColumnsConfig | None = None) -> None:
    """out [M, N] = x [M, K] @ W.T (+ bias), W held as column-layout words [K / BLOCK * WORDS, N]; arguments
    checked by the caller (M <= MAX_ROWS, x unit stride along K)."""
    (num_rows, k), n = x.shape, words.shape[1]
    if num_rows == 0 or n == 0:
        return
    if config is None:
        num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
        config = launch_config(num_rows, n, k, num_sms)
    steps = triton.cdiv(k, STEP)
    steps_per_slice = triton.cdiv(steps, max(1, min(config.split_k, steps)))
    split_k = triton.cdiv(steps, steps_per_slice)
    block_n = config.block_n
    partial = slice_outputs(out, split_k)
    _columns_gemv_kernel[(triton.cdiv(n, block_n), split_k)](
        x, words, bias, partial, num_rows, n, k, x.stride(0), steps, steps_per_slice, 0x3F000000,
        QTYPE=_IDS[qtype], WORDS=WORDS[qtype], HAS_BIAS=bias is not None and split_k == 1,
        BLOCK_M=triton.next_power_of_2(num_rows), BLOCK_N=block_n, num_warps=config.num_warps,
    )
    if split_k > 1:
        add_slices(partial, bias, out)


@triton.jit
def _code(w, BIT: tl.constexpr, WIDTH: tl.constexpr, AT: tl.constexpr):
    """The WIDTH-bit field of int32 w starting at bit BIT, moved to bits AT .. AT + WIDTH - 1 (one shift, one and)."""
    if BIT <= AT:
        moved = w << (AT - BIT)
    else:
        moved = w >> (BIT - AT)
    return moved & (((1 << WIDTH) - 1) << AT)


@triton.jit
def _shift(w, BY: tl.constexpr):
    """w << BY, or w >> -BY for negative BY."""
    if BY >= 0:
        return w << BY
    else:
        return w >> (-BY)


@triton.jit
def _unit(bits):
    """float32 1 + m / 2^23 for mantissa bits m: a code placed in bits 22 down is f in [1, 2), exactly."""
    return (bits | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _columns_gemv_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, x_row_stride, STEPS, STEPS_PER_SLICE, EXPONENT,
    QTYPE: tl.constexpr, WORDS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (n, s): out[:, n * BLOCK_N : (n + 1) * BLOCK_N] over steps [s * STEPS_PER_SLICE, ...) of K (one
    step: 256 weights of a row); with several slices out is float32 [slices, M, N] and s writes out[s].

    Tiles are 2-d, (word, column), and rows of x are a static loop: Triton then lays a tile out as 4 neighbouring
    columns per thread (16-byte loads) with every word of them in that thread, so that the sums over a group's
    words stay in registers (a 3-d (row, word, column) product spreads words over threads and sums by shuffles)."""
    pid = tl.program_id(0)
    slice_id = tl.program_id(1)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]  # (1, BN)
    col_ok = cols < N
    rows = tl.arange(0, BLOCK_M)[:, None]  # (BM, 1)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    first = slice_id * STEPS_PER_SLICE
    for step in range(first, tl.minimum(first + STEPS_PER_SLICE, STEPS)):
        if QTYPE == Q8_0:
            acc = _q8_0_step(w_ptr, step, N, K, cols, col_ok, x_ptr, x_row_stride, M, rows, acc, WORDS, BLOCK_M)
        else:
            words = w_ptr + tl.cast(step * WORDS, tl.int64) * N + cols  # (1, BN): word 0 of the step's block
            xs = x_ptr + step * 256
            if QTYPE == Q4_K:
                acc = _q4_k_step(words, N, col_ok, xs, x_row_stride, M, rows, acc, EXPONENT, BLOCK_M)
            else:
                acc = _q6_k_step(words, N, col_ok, xs, x_row_stride, M, rows, acc, EXPONENT, BLOCK_M)
    out_ptr += slice_id * M * N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    tl.store(out_ptr + rows * N + cols, round_to_dtype(acc, dtype).to(dtype), mask=(rows < M) & col_ok)


@triton.jit
def _k_scale_min(s03, m03, lh47, S: tl.constexpr):
    """Q4_K: the 6-bit scale and min of sub-block S (int32) from the three words of a block's 12 scale bytes."""
    if S < 4:
        return (s03 >> (8 * S)) & 63, (m03 >> (8 * S)) & 63
    else:
        sc = ((lh47 >> (8 * (S - 4))) & 15) | (((s03 >> (8 * (S - 4) + 6)) & 3) << 4)
        mn = ((lh47 >> (8 * (S - 4) + 4)) & 15) | (((m03 >> (8 * (S - 4) + 6)) & 3) << 4)
        return sc, mn


@triton.jit
def _byte_unit(codes, exponent, I: tl.constexpr):
    """float32 1 + c / 128 for the 7-bit code c in byte I of `codes` whose bytes are 0x80 | c: the byte moved into
    bits 16-23 under exponent byte 0x3F, one `prmt` (byte permute) per weight. exponent: the int32 0x3F000000."""
    if INTERPRETED:
        bits = ((codes >> (8 * I)) & 0xFF) << 16 | 0x3F000000
    else:
        # selector nibbles, d's byte 0 up: 4, 4 (the zero bytes of 0x3F000000), I (codes' byte I), 7 (0x3F). The
        # selector is the immediate and `exponent` (0x3F000000) a kernel argument: given a constant there, ptxas
        # makes it the immediate and rebuilds the selector in a register before every prmt.
        exponent = exponent + tl.zeros(codes.shape, tl.int32)
        if I == 0:
            asm: tl.constexpr = "prmt.b32 $0, $1, $2, 0x7044;"
        elif I == 1:
            asm: tl.constexpr = "prmt.b32 $0, $1, $2, 0x7144;"
        elif I == 2:
            asm: tl.constexpr = "prmt.b32 $0, $1, $2, 0x7244;"
        else:
            asm: tl.constexpr = "prmt.b32 $0, $1, $2, 0x7344;"
        bits = tl.inline_asm_elementwise(asm, "=r,r,r", [codes, exponent], dtype=tl.int32, is_pure=True, pack=1)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _x_at(xs, I: tl.constexpr, x_ok, pair):
    """(x at xs + I as float32, pair): bf16 x is loaded two at a time, bytes I and I + 1 of a word being neighbours
    in x: an even I loads the 32-bit pair, which the odd I after it takes from `pair`."""
    # x_ok may be a scalar, which Triton 3.9's interpreter rejects as a mask: made a tensor of xs's shape
    x_ok = tl.where(x_ok, tl.full(xs.shape, 1, tl.int32) > 0, False)
    if xs.dtype.element_ty == tl.bfloat16:
        if I % 2 == 0:
            pair = tl.load((xs + I).to(tl.pointer_type(tl.int32)), mask=x_ok, other=0)
            return (pair << 16).to(tl.float32, bitcast=True), pair
        else:
            return (pair & -65536).to(tl.float32, bitcast=True), pair  # & 0xFFFF0000
    else:
        return tl.load(xs + I, mask=x_ok, other=0.0).to(tl.float32), pair


@triton.jit
def _run(acc, q, xs, x_ok, r, rows, a, b, exponent=0, BYTES: tl.constexpr = True, BIT: tl.constexpr = 0,
         WIDTH: tl.constexpr = 8, AT: tl.constexpr = 15):
    """acc + [rows == r] (a * sum(f x) + b * sum(x)) over a run of 4 x J weights of one scale; x of word j,
    byte i at xs + 4 j + i (xs: (J, 1) pointers). The codes, from words q (J, BN): with BYTES, byte i of each word
    (0x80 | a 7-bit code: f = 1 + code / 128); else the WIDTH-bit field at bit BIT + 8 i, placed at bit AT of
    the mantissa of 1.0."""
    pair = 0
    for i in tl.static_range(4):
        xv, pair = _x_at(xs, i, x_ok, pair)  # (J, 1)
        if BYTES:
            f = _byte_unit(q, exponent, i)
        else:
            f = _unit(_code(q, BIT + 8 * i, WIDTH, AT))
        if i == 0:
            prod = f * xv  # (J, BN)
            xsum = xv
        else:
            prod += f * xv
            xsum += xv
    part = a * tl.sum(prod, axis=0)[None, :] + b * tl.sum(xsum, axis=0)[None, :]  # (1, BN)
    return acc + tl.where(rows == r, part, 0.0)


@triton.jit
def _q4_k_step(words, N, col_ok, xs, x_row_stride, M, rows, acc, exponent, BLOCK_M: tl.constexpr):
    """acc (BM, BN) + x's 256 columns from xs (row 0) times one Q4_K block per column of W, whose word 0 is at
    `words` (1, BN int32 pointers). Group c is qs[32c : 32c + 32] as 8 words j: byte i of word j holds weight
    64c + 4j + i in its low nibble (sub-block 2c) and weight 64c + 32 + 4j + i in its high one (sub-block 2c + 1)."""
    j = tl.arange(0, 8)[:, None]  # (8, 1)
    head = tl.load(words, mask=col_ok, other=0)  # d | dmin << 16
    s03 = tl.load(words + N, mask=col_ok, other=0)  # scales 0-3: sc[0:4], top 2 bits of sc[4:8]
    m03 = tl.load(words + 2 * N, mask=col_ok, other=0)  # scales 4-7: m[0:4], top 2 bits of m[4:8]
    lh47 = tl.load(words + 3 * N, mask=col_ok, other=0)  # scales 8-11: low 4 bits of sc[4:8] | of m[4:8] << 4
    d = fp16_bits(head)
    dmin = fp16_bits(head >> 16)
    for c in tl.static_range(4):
        q = tl.load(words + (4 + 8 * c + j) * N, mask=col_ok, other=0)  # (8, BN)
        for half in tl.static_range(2):
            # the nibbles as bytes 0x80 | q << 3 (| 0x80808080): f = 1 + q / 16, the code in the mantissa's top bits
            codes = _shift(q, 3 - 4 * half) & 0x78787878 | -2139062144
            sc, mn = _k_scale_min(s03, m03, lh47, 2 * c + half)
            a = 16.0 * (d * sc.to(tl.float32))  # weight = (d sc) q - dmin m = a f + b with f = 1 + q / 16
            b = -a - dmin * mn.to(tl.float32)
            for r in tl.static_range(BLOCK_M):
                acc = _run(acc, codes, xs + r * x_row_stride + 64 * c + 32 * half + 4 * j, r < M, r, rows, a, b,
                           exponent)
    return acc


@triton.jit
def _q6_k_step(words, N, col_ok, xs, x_row_stride, M, rows, acc, exponent, BLOCK_M: tl.constexpr):
    """As _q4_k_step for one Q6_K block. Weight 128h + 32t + r (half h, quarter t, r < 32): low 4 bits the nibble
    t // 2 of ql[64h + 32(t % 2) + r], high 2 bits qh[32h + r] >> 2t; scale sc[8h + 2t + r // 16]. As words,
    r = 16u + 4v + i: word 4u + v of a 32-byte run, byte i; the scale changes with u."""
    v = tl.arange(0, 4)[:, None]  # (4, 1)
    d = fp16_bits(tl.load(words + 52 * N, mask=col_ok, other=0))
    for h in tl.static_range(2):
        for u in tl.static_range(2):
            qh = tl.load(words + (32 + 8 * h + 4 * u + v) * N, mask=col_ok, other=0)  # (4, BN)
            for p in tl.static_range(2):
                ql = tl.load(words + (16 * h + 8 * p + 4 * u + v) * N, mask=col_ok, other=0)
                for nib in tl.static_range(2):  # quarter t = p + 2 nib; scale 8h + 2t + u: byte 2p + u of word
                    # bytes 0x80 | q << 1, q the 6-bit codes: f = 1 + q / 64
                    codes = (_shift(ql, 1 - 4 * nib) & 0x1E1E1E1E | _shift(qh, 5 - 2 * (p + 2 * nib)) & 0x60606060
                             | -2139062144)
                    sc_word = tl.load(words + (48 + 2 * h + nib) * N, mask=col_ok, other=0)  # 2h + nib
                    sc = ((sc_word << (24 - 16 * p - 8 * u)) >> 24).to(tl.float32)  # signed int8
                    a = 64.0 * (d * sc)  # weight = (d sc)(q - 32) = a f + b with f = 1 + q / 64
                    b = -1.5 * a
                    for r in tl.static_range(BLOCK_M):
                        acc = _run(acc, codes, xs + r * x_row_stride + 128 * h + 32 * (p + 2 * nib) + 16 * u + 4 * v,
                                   r < M, r, rows, a, b, exponent)
    return acc


@triton.jit
def _q8_0_step(w_ptr, step, N, K, cols, col_ok, x_ptr, x_row_stride, M, rows, acc, WORDS: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """As _q4_k_step for the eight Q8_0 blocks of step `step` (those before K): word 0 of a block holds d, words
    1-8 the signed codes of weights 4j + i, made unsigned (u = q + 128) to be placed in a mantissa."""
    j = tl.arange(0, 8)[:, None]  # (8, 1)
    for g in tl.static_range(8):
        blk = step * 8 + g
        ok = tl.where(blk < K // 32, col_ok, False)  # not col_ok & scalar: int32 under Triton 3.9's interpreter
        words = w_ptr + tl.cast(blk * WORDS, tl.int64) * N + cols
        d = fp16_bits(tl.load(words, mask=ok, other=0))
        q = tl.load(words + (1 + j) * N, mask=ok, other=0) ^ -2139062144  # ^ 0x80808080: u = q + 128 per byte
        a = 256.0 * d  # weight = d q = d (u - 128) = a f + b with f = 1 + u / 256
        b = -1.5 * a
        for r in tl.static_range(BLOCK_M):
            acc = _run(acc, q, x_ptr + r * x_row_stride + 32 * blk + 4 * j, (r < M) & (blk < K // 32), r, rows,
                       a, b, 0, False, 0, 8, 15)
    return acc


@triton.jit
def _dequantize_columns_kernel(w_ptr, out_ptr, N, K, QTYPE: tl.constexpr, WORDS: tl.constexpr,
                               BLOCK_N: tl.constexpr):
    """Program (n, step): rows [step * 256, ...) of W.T [K, N] (out, N contiguous), columns [n * BLOCK_N, ...):
    gguf's float32 weights rounded to out's dtype."""
    step = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    col_ok = cols < N
    j = tl.arange(0, 8)[:, None]  # (8, 1)
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    out_rows = out_ptr + (step * 256 + 4 * j).to(tl.int64) * N + cols  # (8, BN): weight 4j of the step
    if QTYPE == Q8_0:
        for g in tl.static_range(8):
            blk = step * 8 + g
            ok = tl.where(blk < K // 32, col_ok, False)  # not col_ok & scalar: int32 under Triton 3.9's interpreter
            words = w_ptr + tl.cast(blk * WORDS, tl.int64) * N + cols
            d = fp16_bits(tl.load(words, mask=ok, other=0))
            q = tl.load(words + (1 + j) * N, mask=ok, other=0)
            for i in tl.static_range(4):
                w = d * ((q << (24 - 8 * i)) >> 24).to(tl.float32)
                tl.store(out_rows + (32 * g + i) * N, round_to_dtype(w, dtype).to(dtype), mask=ok)
    elif QTYPE == Q4_K:
        words = w_ptr + tl.cast(step * WORDS, tl.int64) * N + cols
        head = tl.load(words, mask=col_ok, other=0)
        s03 = tl.load(words + N, mask=col_ok, other=0)
        m03 = tl.load(words + 2 * N, mask=col_ok, other=0)
        lh47 = tl.load(words + 3 * N, mask=col_ok, other=0)
        d = fp16_bits(head)
        dmin = fp16_bits(head >> 16)
        for c in tl.static_range(4):
            q = tl.load(words + (4 + 8 * c + j) * N, mask=col_ok, other=0)
            for half in tl.static_range(2):
                sc, mn = _k_scale_min(s03, m03, lh47, 2 * c + half)
                scale = d * sc.to(tl.float32)
                offset = dmin * mn.to(tl.float32)
                for i in tl.static_range(4):
                    code = ((q >> (8 * i + 4 * half)) & 15).to(tl.float32)
                    tl.store(out_rows + (64 * c + 32 * half + i) * N,
                             round_to_dtype(scale * code - offset, dtype).to(dtype), mask=col_ok)
    else:  # Q6_K
        words = w_ptr + tl.cast(step * WORDS, tl.int64) * N + cols
        d = fp16_bits(tl.load(words + 52 * N, mask=col_ok, other=0))
        for h in tl.static_range(2):
            qh = tl.load(words + (32 + 8 * h + j) * N, mask=col_ok, other=0)
            for p in tl.static_range(2):
                ql = tl.load(words + (16 * h + 8 * p + j) * N, mask=col_ok, other=0)
                for nib in tl.static_range(2):  # quarter t = p + 2 nib
                    sc_word = tl.load(words + (48 + 2 * h + nib) * N, mask=col_ok, other=0)
                    sc = ((sc_word << (24 - 16 * p - 8 * (j // 4))) >> 24).to(tl.float32)  # (8, BN)
                    scale = d * sc
                    for i in tl.static_range(4):
                        code = (((ql >> (8 * i + 4 * nib)) & 15) | (((qh >> (8 * i + 2 * (p + 2 * nib))) & 3) << 4)) - 32
                        tl.store(out_rows + (128 * h + 32 * (p + 2 * nib) + i) * N,
                                 round_to_dtype(scale * code.to(tl.float32), dtype).to(dtype), mask=col_ok)


def launch_dequantize_columns(words: torch.Tensor, qtype: str, out: torch.Tensor) -> None:
    """out [K, N] = W.T, W the weights of column-layout words (gguf's float32 values rounded to out's dtype)."""
    k, n = out.shape
    if k == 0 or n == 0:
        return
    block_n = 128
    _dequantize_columns_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, STEP))](
        words, out, n, k, QTYPE=_IDS[qtype], WORDS=WORDS[qtype], BLOCK_N=block_n, num_warps=1)
