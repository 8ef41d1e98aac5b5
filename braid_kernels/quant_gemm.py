"""The fused dequantising GEMM: y = x @ W.T for batches of rows, W read as GGML blocks (planes layout,
quant_planes.py) and decoded in registers, step by step, straight into the tensor cores; the dequantised weight
never reaches global memory.

Each program owns an output tile of BLOCK_N weight rows x BLOCK_M rows of x, computed transposed (acc [BLOCK_N,
BLOCK_M] = W_tile @ x_tile.T, "swap AB"): the decoded weights are the MMA's A operand and x the B operand, whose
N side may be as narrow as 16. K is walked one *group* at a time (quant_decode.py: 2 x 16-32 weights sharing their
scales, a `lo` and a `hi` run of contiguous columns): a step decodes a (BLOCK_N, lanes) tile of each run with
quant_decode.block_codes, rounds it to x's dtype and multiplies it with the x columns of its run, so the decode
tiles stay 2-d and small (no spills). The sums are float32 (float32 x in full float32 precision, "ieee", no
tf32). Narrow outputs split K into slices summed afterwards.

Measured on an H200 (benchmarks/RESULTS.md), time against bf16 matmul, Q4_K / Q6_K on 4096x4096, 28672x4096 and
4096x14336: at 16 rows 0.36-0.53x (dequantise + cuBLAS 0.32-0.47x), at 64 rows 0.39-0.47x (0.35-0.46x), at 256
rows 0.25-0.30x (0.44-0.54x). quant_linear takes it by default from 5 to 64 rows on the larger matrices
(quant.GEMM_MIN_WEIGHTS) of the types other than Q4_K and Q6_K, and of those with float32 x or Q6_K rows of an odd
number of blocks (not 4-byte aligned).

Q4_K and Q6_K with 16-bit x have kernels of their own, `_q4k_gemm_kernel` and `_q6k_gemm_kernel` (the half-block
kernels): a step is half a block (128 weights of each row), whose quants are loaded as int32 words and decoded in
place (each code shifted and masked into a float32 mantissa, one multiply-add with its run's scale and offset); the
128-wide tile goes to the tensor cores in one dot, and the next step's scales are loaded a step ahead. A Q4_K tile's K
order is the words' (word, byte, nibble), not the weights', so x is permuted to it once per call (`permute_q4k`, one
copy of x); a Q6_K tile's is the weights' own. K slices are summed by one kernel (quant_gemv.add_slices). H200, time
against bf16 matmul at 16 / 64 / 128 rows (benchmarks/RESULTS.md): Q4_K 0.56-0.66x / 0.47-0.58x / 0.41-0.55x and Q6_K
0.48-0.64x / 0.45-0.52x / 0.38-0.53x on 4096x4096, 6144x4096, 28672x4096 and 4096x14336, against this group kernel's
0.34-0.47x at 16-64 rows and dequantise + cuBLAS's 0.35-0.46x at 128; at 256 rows dequantise + cuBLAS is ahead.
Q4_K tiles of 64 rows of x turn the product around (`QuantGemmConfig.x_first`: acc [BLOCK_M, BLOCK_N] = x_tile @
W_tile.T, the decoded weights stored to shared memory as the second operand instead of going through it to the
registers of the first): 0.56-0.63x at 40-64 rows on all but 4096x4096 (0.46-0.49x there, 0.48-0.51x before).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .numerics import INTERPRETED, pdl_options, round_to_dtype, wait_for_inputs
from .quant_decode import GROUP_LANES, GROUPS_PER_BLOCK, QTYPE_IDS, block_codes, block_fields, fp16_bits, \
    k_scale_bytes, k_unpack_scale_min, num_groups
from .quant_formats import BLOCK_SIZE, TYPE_SIZE
from .quant_gemv import add_slices, slice_outputs


HALF_BLOCK = 128
"""Columns per K step of the half-block kernels (Q4_K, Q6_K)."""
HALF_BLOCK_TYPES = ("Q4_K", "Q6_K")
X_FIRST_TYPES = ("Q4_K",)
"""The half-block types whose tiles of 64 rows of x take x as the tensor-core product's first operand. Not Q6_K: with x
first, its kernel fails in Triton 3.6's dot-operand pass (TritonGPUOptimizeDotOperands) on sm_90."""


class QuantGemmConfig(NamedTuple):
    """A launch configuration: weight rows and rows of x per program, warps, software-pipeline stages, slices of K
    (programs summing into float32 partials), and for the half-block kernels whether x is the tensor-core product's
    first operand (x_first: the decoded weights are stored to shared memory as its second; otherwise they are the
    first, from registers)."""

    block_n: int
    block_m: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    x_first: bool = False


def launch_config(qtype: str, num_rows: int, n: int, num_sms: int = 132, k: int | None = None) -> QuantGemmConfig:
    """The configuration for x [num_rows, K] @ W[n, K].T of 16-bit x on a device of `num_sms` multiprocessors: the
    half-block kernels' (`_half_block_launch_config`) for Q4_K and Q6_K, the group kernel's (`group_launch_config`)
    for the other types."""
    if qtype in HALF_BLOCK_TYPES:
        return _half_block_launch_config(qtype, num_rows, n, num_sms, k)
    return group_launch_config(qtype, num_rows, n, num_sms, k)


def uses_half_block(qtype: str, row_bytes: int, dtype: torch.dtype) -> bool:
    """Whether launch_gemm runs a half-block kernel: Q4_K or Q6_K, 16-bit x, rows of a multiple of 4 bytes (Q6_K rows
    of an odd number of blocks are not)."""
    return qtype in HALF_BLOCK_TYPES and dtype != torch.float32 and row_bytes % 4 == 0


def group_launch_config(qtype: str, num_rows: int, n: int, num_sms: int = 132,
                        k: int | None = None) -> QuantGemmConfig:
    """The group kernel's configuration (any type): up to 16 rows of
    x, 128 x 16 tiles; 32 rows, 128 x 32; 64 rows, 64 x 64 for N above 8192, else 128 x 64 on 8 warps; above,
    128 x 128 on 8 warps; K split into slices (by powers of two) while there are fewer programs than SMs and each
    slice keeps at least 16 group steps. The best or within 10% of the best of 7 tilings each for Q4_K and Q6_K at
    16, 64 and 256 rows on 4096x4096, 28672x4096 and 4096x14336 (H200; benchmarks/RESULTS.md). Float32 x is
    limited to 32-row tiles and one stage by launch_gemm, whatever the configuration."""
    if num_rows <= 32:
        block_n, block_m, num_warps = 128, max(16, triton.next_power_of_2(num_rows)), 4
    elif num_rows <= 64:
        block_n, block_m, num_warps = (64, 64, 4) if n > 8192 else (128, 64, 8)
    else:
        block_n, block_m, num_warps = 128, 128, 8
    split_k = 1
    if k is not None:
        steps = num_groups(qtype, k)
        programs = triton.cdiv(n, block_n) * triton.cdiv(num_rows, block_m)
        while programs * split_k < num_sms and steps // (2 * split_k) >= 16:
            split_k *= 2
    return QuantGemmConfig(block_n, block_m, num_warps, num_stages=3, split_k=split_k)


def _half_block_launch_config(qtype: str, num_rows: int, n: int, num_sms: int, k: int | None) -> QuantGemmConfig:
    """The configuration of the half-block kernels (`_q4k_gemm_kernel`, `_q6k_gemm_kernel`): 64 rows of W per
    program on 4 warps; tiles of up to 64 rows of x (16 at least) over 4 stages, of 128 rows over 3 for more than 64
    rows; K split (by powers of two) while there are fewer than two programs per SM and each slice keeps at least 4
    steps (the best of 8 tilings on the four shapes above at 16 and 64 rows, or within 10% of it, and of 5 at 128
    rows). Q4_K tiles of 64 rows of x (33-64 rows) take x as the tensor-core product's first operand, over 3 stages
    (X_FIRST_TYPES; H200, 40 and 64 rows: 0.84-0.95 of the time on 6144x4096, 28672x4096 and 4096x14336, 1.02-1.05
    on 4096x4096; slower at 16 and 128 rows)."""
    block_m = min(128, max(16, triton.next_power_of_2(num_rows)))
    x_first = block_m == 64 and qtype in X_FIRST_TYPES
    num_stages = 4 if block_m <= 64 and not x_first else 3
    split_k = 1
    if k is not None:
        steps = k // HALF_BLOCK
        programs = triton.cdiv(n, 64) * triton.cdiv(num_rows, block_m)
        while programs * split_k < 2 * num_sms and steps // (2 * split_k) >= 4:
            split_k *= 2
    return QuantGemmConfig(64, block_m, 4, num_stages=num_stages, split_k=split_k, x_first=x_first)


def permute_q4k(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] with the columns of each 128 in `_q4k_gemm_kernel`'s K order: position c * 64 + j * 8 + b * 2 + h
    of a chunk holds column c * 64 + h * 32 + j * 4 + b (word j of the chunk's half c, byte b, nibble h). A new
    contiguous tensor."""
    num_rows, k = x.shape
    return x.unflatten(1, (k // HALF_BLOCK, 2, 2, 8, 4)).permute(0, 1, 2, 4, 5, 3).reshape(num_rows, k)


def launch_gemm(x: torch.Tensor, blocks: torch.Tensor, qtype: str, bias: torch.Tensor | None, out: torch.Tensor,
                config: QuantGemmConfig | None = None) -> None:
    """out [M, N] = x [M, K] @ W.T (+ bias) with W the weights of blocks [N, row_bytes] (planes layout); arguments
    checked."""
    (num_rows, k), n = x.shape, blocks.shape[0]
    if num_rows == 0 or n == 0:
        return
    half_block = uses_half_block(qtype, blocks.shape[1], x.dtype)
    if config is None:
        num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        config = (_half_block_launch_config(qtype, num_rows, n, num_sms, k) if half_block
                  else group_launch_config(qtype, num_rows, n, num_sms, k))
    elif config.x_first and not (half_block and qtype in X_FIRST_TYPES):
        raise ValueError(f"x_first takes the half-block kernel of {', '.join(X_FIRST_TYPES)} (16-bit x), not {qtype} "
                         f"with {str(x.dtype).removeprefix('torch.')} x")
    if half_block:
        _launch_half_block(qtype, x, blocks, bias, out, config)
        return
    if x.dtype == torch.float32:  # float32 tiles are twice as large
        config = config._replace(block_m=min(config.block_m, 32), num_stages=1)
    steps = num_groups(qtype, k)
    slice_steps, split_k, partial = _k_slices(steps, config.split_k, out)
    grid = (triton.cdiv(num_rows, config.block_m), triton.cdiv(n, config.block_n), split_k)
    _quant_gemm_kernel[grid](
        x, blocks, bias, partial, num_rows, n, x.stride(0), blocks.shape[1], steps, slice_steps,
        QTYPE=QTYPE_IDS[qtype], BLOCK_SIZE=BLOCK_SIZE[qtype], TYPE_SIZE=TYPE_SIZE[qtype],
        GROUPS=GROUPS_PER_BLOCK[qtype], LANES=GROUP_LANES[qtype], HAS_BIAS=bias is not None and split_k == 1,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps, num_stages=config.num_stages,
        **pdl_options(x),
    )
    if split_k > 1:
        add_slices(partial, bias, out)


def _k_slices(steps: int, split_k: int, out: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """K's `steps` cut into about `split_k` slices: (steps per slice, slices, where the programs write: out itself,
    or float32 partials [slices, M, N] for add_slices). No slice is empty; K = 0 (quant_linear does not launch it)
    makes one."""
    slice_steps = max(1, triton.cdiv(steps, max(1, split_k)))
    slices = triton.cdiv(max(steps, 1), slice_steps)
    return slice_steps, slices, slice_outputs(out, slices)


def _launch_half_block(qtype: str, x, blocks, bias, out, config: QuantGemmConfig) -> None:
    """launch_gemm's Q4_K / Q6_K path for 16-bit x (config's split_k counts steps of HALF_BLOCK columns)."""
    (num_rows, k), n = x.shape, blocks.shape[0]
    steps = k // HALF_BLOCK
    slice_steps, split_k, partial = _k_slices(steps, config.split_k, out)
    if qtype == "Q4_K":
        x, kernel, orientation = permute_q4k(x), _q4k_gemm_kernel, {"X_FIRST": config.x_first}
    else:
        kernel, orientation = _q6k_gemm_kernel, {}
    grid = (triton.cdiv(num_rows, config.block_m), triton.cdiv(n, config.block_n), split_k)
    kernel[grid](
        x, blocks, bias, partial, num_rows, n, x.stride(0), blocks.shape[1], steps, slice_steps,
        HAS_BIAS=bias is not None and split_k == 1, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        num_warps=config.num_warps, num_stages=config.num_stages, **orientation, **pdl_options(x),
    )
    if split_k > 1:
        add_slices(partial, bias, out)


@triton.jit
def _quant_gemm_kernel(
    x_ptr, blocks_ptr, bias_ptr, out_ptr, M, N, x_row_stride, row_bytes, num_steps, slice_steps,
    QTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr, TYPE_SIZE: tl.constexpr, GROUPS: tl.constexpr,
    LANES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (m, n, s): out[m * BLOCK_M : (m + 1) * BLOCK_M, n * BLOCK_N : (n + 1) * BLOCK_N] over group steps
    [s * slice_steps, (s + 1) * slice_steps) of K (out is float32 [slices, M, N] with several slices)."""
    wait_for_inputs(PDL)
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    rows, cols, out_ptr = _program_tile(out_ptr, M, N, BLOCK_M, BLOCK_N)
    row_ptr = blocks_ptr + cols.to(tl.int64)[:, None] * row_bytes  # (BN, 1)
    nb = row_bytes // TYPE_SIZE
    col_ok = (cols < N)[:, None]
    lane = tl.arange(0, LANES)[None, :]  # (1, L)
    x_rows = x_ptr + rows[None, :].to(tl.int64) * x_row_stride  # (1, BM)
    row_ok = (rows < M)[None, :]

    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    first = tl.program_id(2) * slice_steps
    for step in range(first, tl.minimum(first + slice_steps, num_steps)):
        blk = step // GROUPS
        qs, qh, scales, head = block_fields(row_ptr, blk, nb, QTYPE)
        f_lo, f_hi, a_lo, b_lo, a_hi, b_hi, col_lo, col_hi = block_codes(qs, qh, scales, head, step % GROUPS, lane,
                                                                         col_ok, QTYPE)  # f: (BN, L); a, b: (BN, 1)
        w_lo = _to_dtype(a_lo * f_lo + b_lo, dtype)  # one multiply-add per weight
        w_hi = _to_dtype(a_hi * f_hi + b_hi, dtype)
        # x's columns of each run as (L, 1) (+ 0 * lane: the 32-weight types' columns are the lanes themselves)
        x_lo = tl.load(x_rows + (blk * BLOCK_SIZE + tl.trans(col_lo + 0 * lane)), mask=row_ok, other=0.0)  # (L, BM)
        x_hi = tl.load(x_rows + (blk * BLOCK_SIZE + tl.trans(col_hi + 0 * lane)), mask=row_ok, other=0.0)
        acc = _dot(w_lo, x_lo, acc)
        acc = _dot(w_hi, x_hi, acc)

    _store_tile(acc, rows, cols, bias_ptr, out_ptr, M, N, HAS_BIAS)


@triton.jit
def _program_tile(out_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (m, n, s)'s rows of x (BM,), rows of W (BN,), and its slice of out (float32 [slices, M, N] when K is
    split)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, cols, out_ptr + tl.program_id(2).to(tl.int64) * M * N


@triton.jit
def _store_tile(acc, rows, cols, bias_ptr, out_ptr, M, N, HAS_BIAS: tl.constexpr):
    """out[rows, cols] = acc [BN, BM] transposed (+ bias[cols]), rounded to out's dtype; rows and cols 1-d."""
    y = tl.trans(acc)  # (BM, BN)
    rows2 = rows[:, None]
    cols2 = cols[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols2, mask=cols2 < N, other=0.0).to(tl.float32)
    out_dtype: tl.constexpr = out_ptr.dtype.element_ty
    tl.store(out_ptr + rows2.to(tl.int64) * N + cols2, round_to_dtype(y, out_dtype).to(out_dtype),
             mask=(rows2 < M) & (cols2 < N))


@triton.jit
def _to_dtype(w, dtype: tl.constexpr):
    """float32 weights rounded to nearest in `dtype` (the interpreter's bf16 cast truncates: numerics.py)."""
    if INTERPRETED:
        return round_to_dtype(w, dtype).to(dtype)
    else:
        return w.to(dtype)


@triton.jit
def _dot(w, x, acc):
    """acc += w [BN, BK] @ x [BK, BM]; float32 x in full precision."""
    if INTERPRETED or x.dtype == tl.float32:
        # The interpreter (Triton 3.9) multiplies bf16 operands as their raw uint16 bits: widen them first (exact).
        return tl.dot(w.to(tl.float32), x.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(w, x, acc)



@triton.jit
def _x_steps(x_ptr, rows, x_row_stride, M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, X_FIRST: tl.constexpr):
    """The half-block kernels' x tile of the first step (pointers and mask) and zero accumulator: x (BM, 128) and acc
    (BM, BN) when x is the dot's first operand (X_FIRST: the decoded weights go to shared memory as the second), else
    x (128, BM) and acc (BN, BM) (the weights are the first operand, from registers)."""
    if X_FIRST:
        tile = x_ptr + rows[:, None].to(tl.int64) * x_row_stride + tl.arange(0, 128)[None, :]
        return tile, (rows < M)[:, None], tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    else:
        tile = x_ptr + rows[None, :].to(tl.int64) * x_row_stride + tl.arange(0, 128)[:, None]
        return tile, (rows < M)[None, :], tl.zeros([BLOCK_N, BLOCK_M], tl.float32)


@triton.jit
def _step_dot(w, xt, acc, X_FIRST: tl.constexpr):
    """acc += one step's product of the decoded weights w (BN, 128) and x's tile, in _x_steps's orientation."""
    if X_FIRST:
        return _dot(xt, tl.trans(w), acc)
    else:
        return _dot(w, xt, acc)


@triton.jit
def _store_steps(acc, rows, cols, bias_ptr, out_ptr, M, N, HAS_BIAS: tl.constexpr, X_FIRST: tl.constexpr):
    """_store_tile of an accumulator in _x_steps's orientation."""
    if X_FIRST:
        _store_tile(tl.trans(acc), rows, cols, bias_ptr, out_ptr, M, N, HAS_BIAS)
    else:
        _store_tile(acc, rows, cols, bias_ptr, out_ptr, M, N, HAS_BIAS)


@triton.jit
def _q4k_scale_bytes(rows5, blk, sub, row_ok, nb):
    """Q4_K: the packed scale bytes (a, b, c) of sub-blocks `sub` of block blk (quant_decode.k_scale_bytes) and the
    block's head word (d | dmin << 16), as int32, of the rows at byte pointers rows5."""
    a, b, c = k_scale_bytes(rows5 + nb * 128 + blk * 12, sub, row_ok)
    head = tl.load((rows5 + nb * 140 + blk * 4).to(tl.pointer_type(tl.int32)), mask=row_ok, other=0)
    return a, b, c, head


@triton.jit
def _q4k_gemm_kernel(
    x_ptr, blocks_ptr, bias_ptr, out_ptr, M, N, x_row_stride, row_bytes, num_steps, slice_steps,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    X_FIRST: tl.constexpr, PDL: tl.constexpr,
):
    """Program (m, n, s) of the Q4_K GEMM: out[m * BLOCK_M :, n * BLOCK_N :] over steps [s * slice_steps, (s + 1) *
    slice_steps) of 128 columns, x [M, K] contiguous in permute_q4k's order (out float32 [slices, M, N] with several
    slices). The decode tile is (weight row, half c, word j, byte b, nibble h) = (BN, 2, 8, 4, 2)."""
    wait_for_inputs(PDL)
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    rows, cols, out_ptr = _program_tile(out_ptr, M, N, BLOCK_M, BLOCK_N)
    nb = row_bytes // 144
    rows5 = (blocks_ptr + cols.to(tl.int64) * row_bytes)[:, None, None, None, None]
    col_ok = (cols < N)[:, None, None, None, None]
    c = tl.arange(0, 2)[None, :, None, None, None]
    h = tl.arange(0, 2)[None, None, None, None, :]
    word = c * 8 + tl.arange(0, 8)[None, None, :, None, None]  # (1, 2, 8, 1, 1)
    shift = 8 * tl.arange(0, 4)[None, None, None, :, None] + 4 * h  # (1, 1, 1, 4, 2)
    run = 2 * c + h  # sub-block within the step's half block: (1, 2, 1, 1, 2)
    x_tile, row_ok, acc = _x_steps(x_ptr, rows, x_row_stride, M, BLOCK_M, BLOCK_N, X_FIRST)

    first = tl.program_id(2) * slice_steps
    last = tl.minimum(first + slice_steps, num_steps)
    sa, sb, sc, head = _q4k_scale_bytes(rows5, first // 2, (first % 2) * 4 + run, col_ok, nb)
    for step in range(first, last):
        blk = step // 2
        sub = (step % 2) * 4 + run
        ahead = tl.minimum(step + 1, last - 1)  # the next step's scales, loaded while this one computes
        na, nbytes, nc, nhead = _q4k_scale_bytes(rows5, ahead // 2, (ahead % 2) * 4 + run, col_ok, nb)
        qs = tl.load((rows5 + blk * 128 + (step % 2) * 64).to(tl.pointer_type(tl.int32)) + word, mask=col_ok,
                     other=0)  # (BN, 2, 8, 1, 1)
        scale, minimum = k_unpack_scale_min(sa, sb, sc, sub)
        d = fp16_bits(head)
        dmin = fp16_bits(head >> 16)
        a = 16.0 * (d * scale.to(tl.float32))  # weight = (d sc) q - dmin m = a f + b with f = 1 + q / 16 (block_codes)
        b = -a - dmin * minimum.to(tl.float32)
        f = ((((qs >> shift) & 15) << 19) | 0x3F800000).to(tl.float32, bitcast=True)
        w = tl.reshape(_to_dtype(a * f + b, dtype), [BLOCK_N, 128])
        xt = tl.load(x_tile + step * 128, mask=row_ok, other=0.0)
        acc = _step_dot(w, xt, acc, X_FIRST)
        sa, sb, sc, head = na, nbytes, nc, nhead

    _store_steps(acc, rows, cols, bias_ptr, out_ptr, M, N, HAS_BIAS, X_FIRST)


@triton.jit
def _q6k_scale_bytes(rows6, blk, half, sub, row_ok, nb):
    """Q6_K: the int8 scales `sub` of half `half` of block blk and the block's fp16 d, as float32, of the rows at byte
    pointers rows6."""
    scale = tl.load(rows6 + nb * 192 + blk * 16 + half * 8 + sub, mask=row_ok, other=0)
    d = tl.load((rows6 + nb * 208 + blk * 2).to(tl.pointer_type(tl.float16)), mask=row_ok, other=0.0)
    return scale.to(tl.int8, bitcast=True).to(tl.float32), d.to(tl.float32)


@triton.jit
def _q6k_gemm_kernel(
    x_ptr, blocks_ptr, bias_ptr, out_ptr, M, N, x_row_stride, row_bytes, num_steps, slice_steps,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (m, n, s) of the Q6_K GEMM, as _q4k_gemm_kernel: steps of half a block (128 columns), the decode tile
    (weight row, t_hi, t_lo, j_hi, j_lo, byte) = (BN, 2, 2, 2, 4, 4) over the half's 32-weight quarters t = 2 t_hi +
    t_lo and words j = 4 j_hi + j_lo of ql (low nibbles: word 8 t_lo + j, nibble t_hi) and qh (2-bit fields: word j,
    field 2 t): its order is the columns' own, so x is read as it is. Needs 4-aligned rows (an even number of
    blocks)."""
    wait_for_inputs(PDL)
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    rows, cols, out_ptr = _program_tile(out_ptr, M, N, BLOCK_M, BLOCK_N)
    nb = row_bytes // 210
    rows6 = (blocks_ptr + cols.to(tl.int64) * row_bytes)[:, None, None, None, None, None]
    col_ok = (cols < N)[:, None, None, None, None, None]
    t_hi = tl.arange(0, 2)[None, :, None, None, None, None]
    t_lo = tl.arange(0, 2)[None, None, :, None, None, None]
    j_hi = tl.arange(0, 2)[None, None, None, :, None, None]
    word = 4 * j_hi + tl.arange(0, 4)[None, None, None, None, :, None]  # (1, 1, 1, 2, 4, 1)
    byte = 8 * tl.arange(0, 4)[None, None, None, None, None, :]
    sub = 4 * t_hi + 2 * t_lo + j_hi  # the 16-weight sub-block within the half: (1, 2, 2, 2, 1, 1)
    x_tile, row_ok, acc = _x_steps(x_ptr, rows, x_row_stride, M, BLOCK_M, BLOCK_N, False)

    first = tl.program_id(2) * slice_steps
    last = tl.minimum(first + slice_steps, num_steps)
    scale, d = _q6k_scale_bytes(rows6, first // 2, first % 2, sub, col_ok, nb)
    for step in range(first, last):
        blk = step // 2
        half = step % 2
        ahead = tl.minimum(step + 1, last - 1)  # the next step's scales, loaded while this one computes
        next_scale, next_d = _q6k_scale_bytes(rows6, ahead // 2, ahead % 2, sub, col_ok, nb)
        ql = tl.load((rows6 + blk * 128 + half * 64).to(tl.pointer_type(tl.int32)) + 8 * t_lo + word, mask=col_ok,
                     other=0)  # (BN, 1, 2, 2, 4, 1)
        qh = tl.load((rows6 + nb * 128 + blk * 64 + half * 32).to(tl.pointer_type(tl.int32)) + word, mask=col_ok,
                     other=0)  # (BN, 1, 1, 2, 4, 1)
        a = 64.0 * (d * scale)  # weight = d sc (q - 32) = a f + b with f = 1 + q / 64 (block_codes)
        bits = ((((ql >> (byte + 4 * t_hi)) & 15) << 17) | (((qh >> (byte + 4 * t_hi + 2 * t_lo)) & 3) << 21)
                | 0x3F800000)
        w = tl.reshape(_to_dtype(a * bits.to(tl.float32, bitcast=True) - 1.5 * a, dtype), [BLOCK_N, 128])
        xt = tl.load(x_tile + step * 128, mask=row_ok, other=0.0)
        acc = _dot(w, xt, acc)
        scale, d = next_scale, next_d

    _store_tile(acc, rows, cols, bias_ptr, out_ptr, M, N, HAS_BIAS)
