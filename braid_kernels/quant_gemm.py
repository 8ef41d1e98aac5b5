"""The fused dequantising GEMM: y = x @ W.T for batches of rows, W read as GGML blocks and decoded in registers,
step by step, straight into the tensor cores; the dequantised weight never reaches global memory.

Each program owns an output tile of BLOCK_N weight rows x BLOCK_M rows of x, computed transposed (acc [BLOCK_N,
BLOCK_M] = W_tile @ x_tile.T, "swap AB"): the decoded weights are the MMA's A operand and x the B operand, whose
N side may be as narrow as 16. K is walked in steps of whole blocks (one 256-weight block for the K-types, four
32-weight blocks for the others), each step a tile (row of W, block, group, lane) decoded by
quant_decode.block_codes: the block index is the loop's scalar plus a range, which keeps a group's bytes one
contiguous run. A group's weights are a `lo` and a `hi` run of contiguous columns, so a step is two dots, each
against the x columns of its run. The weights are rounded to x's dtype before the dot and the sums are float32
(float32 x in full float32 precision, "ieee", no tf32). Narrow outputs split K into slices summed afterwards.

Measured on an H200 (benchmarks/RESULTS.md): 0.32-0.56x bf16 matmul at 16 rows, 0.26-0.35x at 64 and 0.07-0.20x
at 256, against dequantise + cuBLAS's 0.31-0.48x, 0.34-0.46x and 0.44-0.58x. Triton keeps the 4-d decode tiles in
255 registers and spills from BLOCK_M = 64 on, and loads the quant bytes at most 4 at a time (Triton 3.6); so
quant_linear keeps this path opt-in (path="gemm").
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .numerics import INTERPRETED, round_to_dtype
from .quant_decode import GROUP_LANES, GROUPS_PER_BLOCK, QTYPE_IDS, block_codes, block_fields
from .quant_formats import BLOCK_SIZE, TYPE_SIZE
from .quant_gemv import add_slices


class QuantGemmConfig(NamedTuple):
    """A launch configuration: weight rows and rows of x per program, weights of a row per K step (whole blocks),
    warps, software-pipeline stages, and slices of K (programs summing into float32 partials)."""

    block_n: int
    block_m: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1


def launch_config(qtype: str, num_rows: int, n: int, num_sms: int = 132, k: int | None = None) -> QuantGemmConfig:
    """The configuration for x [num_rows, K] @ W[n, K].T on a device of `num_sms` multiprocessors: BLOCK_M the
    next power of two of M (16 to 128), 128 rows of W per program and 8 warps, a K step of one 256-weight block for
    the K-types and four 32-weight blocks for the others, and K split into slices while there are fewer programs
    than SMs and each slice keeps at least 4 steps. BLOCK_N, warps, stages and slices: the best of
    `benchmarks/quant_kernels.py --gemm --gemm-sweep` for Q4_K and Q6_K at M = 64 on 4096x4096 and 28672x4096
    (H200; benchmarks/RESULTS.md); the 128-weight steps of Q8_0 / Q4_0 / Q4_1 were not swept. Float32 x is
    limited to 32-row tiles and one stage by launch_gemm, whatever the configuration."""
    block_m = min(128, max(16, triton.next_power_of_2(num_rows)))
    block_n = 128
    block_k = max(BLOCK_SIZE[qtype], 128)
    split_k = 1
    if k is not None:
        programs = triton.cdiv(n, block_n) * triton.cdiv(num_rows, block_m)
        while programs * split_k < num_sms and k // block_k >= 8 * split_k:
            split_k *= 2
    return QuantGemmConfig(block_n, block_m, block_k, num_warps=8, num_stages=3, split_k=split_k)


def launch_gemm(x: torch.Tensor, blocks: torch.Tensor, qtype: str, bias: torch.Tensor | None, out: torch.Tensor,
                config: QuantGemmConfig | None = None) -> None:
    """out [M, N] = x [M, K] @ W.T (+ bias) with W the weights of blocks [N, row_bytes]; arguments checked."""
    (num_rows, k), n = x.shape, blocks.shape[0]
    if num_rows == 0 or n == 0:
        return
    if config is None:
        num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        config = launch_config(qtype, num_rows, n, num_sms, k)
    if x.dtype == torch.float32:  # float32 tiles are twice as large: 128 x 128 over 3 stages needs 416 KB
        config = config._replace(block_m=min(config.block_m, 32), num_stages=1)
    block_size = BLOCK_SIZE[qtype]
    step_blocks = config.block_k // block_size
    if config.block_k % block_size or step_blocks & (step_blocks - 1):
        raise ValueError(f"block_k must be {qtype}'s {block_size} weights per block times a power of two, got "
                         f"{config}")
    num_blocks = k // block_size
    steps = triton.cdiv(num_blocks, step_blocks)
    split_k = max(1, min(config.split_k, steps))
    slice_steps = max(1, triton.cdiv(steps, split_k))  # K = 0 (quant_linear does not launch it): one masked step
    split_k = triton.cdiv(max(steps, 1), slice_steps)  # no empty slices
    partial = out if split_k == 1 else torch.empty((split_k, num_rows, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(num_rows, config.block_m), triton.cdiv(n, config.block_n), split_k)
    _quant_gemm_kernel[grid](
        x, blocks, bias, partial, num_rows, n, x.stride(0), blocks.shape[1], num_blocks, slice_steps,
        QTYPE=QTYPE_IDS[qtype], BLOCK_SIZE=block_size, TYPE_SIZE=TYPE_SIZE[qtype],
        GROUPS=GROUPS_PER_BLOCK[qtype], LANES=GROUP_LANES[qtype], STEP_BLOCKS=step_blocks,
        HAS_BIAS=bias is not None and split_k == 1,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if split_k > 1:
        add_slices(partial, bias, out)


@triton.jit
def _quant_gemm_kernel(
    x_ptr, blocks_ptr, bias_ptr, out_ptr, M, N, x_row_stride, row_bytes, num_blocks, slice_steps,
    QTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr, TYPE_SIZE: tl.constexpr, GROUPS: tl.constexpr,
    LANES: tl.constexpr, STEP_BLOCKS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (m, n, s): out[m * BLOCK_M : (m + 1) * BLOCK_M, n * BLOCK_N : (n + 1) * BLOCK_N] over K steps
    [s * slice_steps, (s + 1) * slice_steps) (out is float32 [slices, M, N] with several slices). A step is
    STEP_BLOCKS whole blocks of each row of W, decoded as a tile (row of W, block, group, lane): the block index is a
    scalar plus a range, so that the quant bytes of a group are one contiguous run (Triton 3.6 still loads them at
    most 4 bytes at a time)."""
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    KSTEP: tl.constexpr = STEP_BLOCKS * GROUPS * LANES  # weights per run (lo or hi) per step
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    out_ptr += tl.program_id(2).to(tl.int64) * M * N
    row_base = blocks_ptr + cols.to(tl.int64)[:, None, None, None] * row_bytes  # (BN, 1, 1, 1)
    nb = row_bytes // TYPE_SIZE
    col_ok = (cols < N)[:, None, None, None]
    sb = tl.arange(0, STEP_BLOCKS)[None, :, None, None]  # (1, SB, 1, 1)
    c = tl.arange(0, GROUPS)[None, None, :, None]  # (1, 1, G, 1)
    lane = tl.arange(0, LANES)[None, None, None, :]  # (1, 1, 1, L)
    x_rows = x_ptr + rows[None, :].to(tl.int64) * x_row_stride  # (1, BM)
    row_ok = (rows < M)[None, :]

    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    first = tl.program_id(2) * slice_steps
    for step in range(first, first + slice_steps):
        blk = step * STEP_BLOCKS + sb  # (1, SB, 1, 1)
        blk_ok = blk < num_blocks
        qs, qh, scales, head = block_fields(row_base, blk, nb, QTYPE)
        f_lo, f_hi, a_lo, b_lo, a_hi, b_hi, col_lo, col_hi = block_codes(
            qs, qh, scales, head, c, lane, col_ok & blk_ok, QTYPE)  # f: (BN, SB, G, L); a, b: (BN, SB, G, 1)
        w_lo = tl.reshape(a_lo * f_lo + b_lo, (BLOCK_N, KSTEP))  # one multiply-add per weight
        w_hi = tl.reshape(a_hi * f_hi + b_hi, (BLOCK_N, KSTEP))
        # Columns of x per weight, broadcast to the tile's (1, SB, G, L) (+ 0 * c: the 32-weight types' columns have
        # no group axis), flattened in the weights' order.
        k_lo = tl.reshape(blk * BLOCK_SIZE + col_lo + 0 * c, (KSTEP, 1))  # (KSTEP, 1)
        k_hi = tl.reshape(blk * BLOCK_SIZE + col_hi + 0 * c, (KSTEP, 1))
        k_ok = tl.reshape(blk_ok & (c >= 0) & (lane >= 0), (KSTEP, 1)) & row_ok
        x_lo = tl.load(x_rows + k_lo, mask=k_ok, other=0.0)  # (KSTEP, BM)
        x_hi = tl.load(x_rows + k_hi, mask=k_ok, other=0.0)
        acc = _dot(_to_dtype(w_lo, dtype), x_lo, acc)
        acc = _dot(_to_dtype(w_hi, dtype), x_hi, acc)

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

