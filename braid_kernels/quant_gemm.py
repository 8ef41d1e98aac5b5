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
rows 0.25-0.30x (0.44-0.54x). The step decodes ~4 instructions per weight per BLOCK_M rows of x, so the kernel is
issue-bound and gains only where reading the blocks once beats writing and re-reading bf16: quant_linear takes it
by default from 5 to 64 rows on the larger matrices (quant.GEMM_MIN_WEIGHTS).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .numerics import INTERPRETED, pdl_options, round_to_dtype, wait_for_inputs
from .quant_decode import GROUP_LANES, GROUPS_PER_BLOCK, QTYPE_IDS, block_codes, block_fields, num_groups
from .quant_formats import BLOCK_SIZE, TYPE_SIZE
from .quant_gemv import add_slices


class QuantGemmConfig(NamedTuple):
    """A launch configuration: weight rows and rows of x per program, warps, software-pipeline stages, and slices of
    K (programs summing into float32 partials)."""

    block_n: int
    block_m: int
    num_warps: int
    num_stages: int
    split_k: int = 1


def launch_config(qtype: str, num_rows: int, n: int, num_sms: int = 132, k: int | None = None) -> QuantGemmConfig:
    """The configuration for x [num_rows, K] @ W[n, K].T on a device of `num_sms` multiprocessors: up to 16 rows of
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


def launch_gemm(x: torch.Tensor, blocks: torch.Tensor, qtype: str, bias: torch.Tensor | None, out: torch.Tensor,
                config: QuantGemmConfig | None = None) -> None:
    """out [M, N] = x [M, K] @ W.T (+ bias) with W the weights of blocks [N, row_bytes] (planes layout); arguments
    checked."""
    (num_rows, k), n = x.shape, blocks.shape[0]
    if num_rows == 0 or n == 0:
        return
    if config is None:
        num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        config = launch_config(qtype, num_rows, n, num_sms, k)
    if x.dtype == torch.float32:  # float32 tiles are twice as large
        config = config._replace(block_m=min(config.block_m, 32), num_stages=1)
    steps = num_groups(qtype, k)
    slice_steps = max(1, triton.cdiv(steps, max(1, config.split_k)))  # K = 0 (quant_linear does not launch it)
    split_k = triton.cdiv(max(steps, 1), slice_steps)  # no empty slices
    partial = out if split_k == 1 else torch.empty((split_k, num_rows, n), dtype=torch.float32, device=x.device)
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
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    out_ptr += tl.program_id(2).to(tl.int64) * M * N
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

