"""The dequantising GEMV: y = x @ W.T for a few rows of x (decode steps), W read as GGML blocks straight from memory.

At batch 1 a projection is bound by reading its weight, and a Q4_K weight is 3.56x smaller than bf16, so the kernel
must stream the blocks at full bandwidth and keep the decode off the critical path. Each program owns BLOCK_N
weight rows and walks K in steps of BLOCK_G groups (braid_kernels/quant_decode.py): every step loads BLOCK_N x BLOCK_G
runs of 16-32 contiguous bytes (vector loads where the block size keeps them aligned), decodes each group's scales
once and its codes into floats f in [1, 2) (quant_decode.decode_codes: no int-to-float conversions), and adds
a * sum(f * x) + b * sum(x) per (row of x, row of W, group): one multiply-add per weight; the sums over K happen
once at the end. 16-bit x at the same M takes the integer-dot GEMV by default (braid_kernels/quant_dot.py). x (a few
KB) is re-read by every program from L1/L2. The configurations below keep ~4 programs per SM by shrinking
BLOCK_N for narrow N and, below one row per program, by splitting K into slices whose float32 partial sums
are added afterwards (a second, tiny pass; no atomics, so results are deterministic).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .numerics import is_interpreted, pdl_options, round_to_dtype, wait_for_inputs
from .quant_decode import GROUP_LANES, GROUPS_PER_BLOCK, QTYPE_IDS, decode_codes, num_groups
from .quant_formats import BLOCK_SIZE, TYPE_SIZE

MAX_ROWS = 8  # rows of x per launch; larger batches take the GEMM path


class QuantGemvConfig(NamedTuple):
    """A launch configuration: weight rows per program, weights of a row per loop step, warps, and the number of
    slices K is split into (each program sums one; a float32 sum of the slices' partial products follows)."""

    block_n: int
    block_k: int
    num_warps: int
    split_k: int = 1


def launch_config(qtype: str, num_rows: int, n: int, num_sms: int, k: int | None = None) -> QuantGemvConfig:
    """The configuration for x [num_rows, k] @ W[n, k].T on a device of `num_sms` multiprocessors.

    Not yet tuned on a GPU (benchmarks/quant_kernels.py --sweep times the neighbours). The reasoning, checked in
    the sm_90 PTX and ptxas' report (Triton 3.9): a step of 4 weight rows x 4096 weights gives each of 8 warps'
    threads 32 contiguous bytes of 4-bit quants (two 16-byte loads; Q8_0, Q6_K: 2-byte loads, their 34/210-byte
    blocks being only 2-aligned) in flight at once, with 80-100 registers and no spills; the scales are loaded one
    group per thread and x once per program, then broadcast through shared memory. block_k shrinks as rows of x
    are added, keeping the float32 accumulator (rows x 4 x block_k / 2 values over 256 threads) at ~32 registers
    (~120 registers in all at 2-8 rows). BLOCK_N drops to 2 or 1 where N / 4 would give fewer than 4 programs per
    SM (k/v projections, N = 1024). Narrower still (N < 2 programs per SM at one row each), K is split so that
    there are ~4 programs per SM again, at the cost of a float32 partial buffer and its sum.
    """
    block_m = triton.next_power_of_2(max(num_rows, 1))
    min_block_k = 2 * GROUP_LANES[qtype]
    block_k = max(min_block_k, 4096 // block_m)
    block_n = 4
    while block_n > 1 and triton.cdiv(n, block_n) < 4 * num_sms:
        block_n //= 2
    split_k = 1
    if k is not None and n < 2 * num_sms:
        split_k = max(1, min(triton.cdiv(4 * num_sms, n), k // min_block_k, 16))
        block_k = max(min_block_k, min(block_k, triton.next_power_of_2(triton.cdiv(k, split_k))))
    return QuantGemvConfig(block_n, block_k, num_warps=8 if block_m * block_n * block_k >= 4096 else 4,
                           split_k=split_k)


def launch_gemv(x: torch.Tensor, blocks: torch.Tensor, qtype: str, bias: torch.Tensor | None, out: torch.Tensor,
                config: QuantGemvConfig | None = None) -> None:
    """out [M, N] = x [M, K] @ W.T (+ bias) with W the weights of blocks [N, row_bytes]; arguments checked."""
    (num_rows, k), n = x.shape, blocks.shape[0]
    if num_rows == 0 or n == 0:
        return
    if config is None:
        num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        config = launch_config(qtype, num_rows, n, num_sms, k)
    steps = split_steps(qtype, k, config)
    partial = slice_outputs(out, steps.split_k)
    _quant_gemv_kernel[(triton.cdiv(n, config.block_n), steps.split_k)](
        x, blocks, bias, partial, num_rows, n, x.stride(0), blocks.shape[1],
        QTYPE=QTYPE_IDS[qtype], BLOCK_SIZE=BLOCK_SIZE[qtype], TYPE_SIZE=TYPE_SIZE[qtype],
        GROUPS=GROUPS_PER_BLOCK[qtype], LANES=GROUP_LANES[qtype], NUM_GROUPS=steps.num_groups,
        SPLIT_GROUPS=steps.split_groups, HAS_BIAS=bias is not None and steps.split_k == 1,
        BLOCK_M=triton.next_power_of_2(num_rows), BLOCK_N=config.block_n, BLOCK_G=steps.block_g,
        num_warps=config.num_warps, **pdl_options(x),
    )
    if steps.split_k > 1:
        add_slices(partial, bias, out)


class SplitSteps(NamedTuple):
    """How a GEMV walks K: groups in all, groups per step, groups per slice (a whole number of steps, so that
    slices never overlap) and slices."""

    num_groups: int
    block_g: int
    split_groups: int
    split_k: int


def split_steps(qtype: str, k: int, config: QuantGemvConfig) -> SplitSteps:
    """The K walk of config (block_k weights per step, split_k slices asked for) over k columns of qtype."""
    groups = num_groups(qtype, k)
    block_g = min(max(1, config.block_k // (2 * GROUP_LANES[qtype])), triton.next_power_of_2(groups))
    split_groups = triton.cdiv(triton.cdiv(groups, max(1, config.split_k)), block_g) * block_g
    return SplitSteps(groups, block_g, split_groups, triton.cdiv(groups, split_groups))


def slice_outputs(out: torch.Tensor, slices: int) -> torch.Tensor:
    """Where the programs of a K split into `slices` write: out itself for one slice, else new float32 partials
    [slices, *out.shape] for add_slices."""
    return out if slices == 1 else torch.empty((slices, *out.shape), dtype=torch.float32, device=out.device)


def add_slices(partial: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """out = the sum of the float32 slices partial [S, M, N] contiguous (+ bias), in out's dtype: one kernel (the
    slices summed in order, then the bias, rounded once), where torch's sum, add and copy took two or three."""
    slices, num_rows, n = partial.shape
    if not partial.is_cuda and not is_interpreted(_add_slices_kernel):  # CPU tensors outside the interpreter
        y = partial.sum(dim=0)
        if bias is not None:
            y += bias.float()
        out.copy_(y)
        return
    block = 256
    _add_slices_kernel[(num_rows, triton.cdiv(n, block))](
        partial, bias, out, n, out.stride(0), slices, HAS_BIAS=bias is not None, BLOCK=block, num_warps=2,
        **pdl_options(partial))


@triton.jit
def _add_slices_kernel(partial_ptr, bias_ptr, out_ptr, N, out_row_stride, SLICES, HAS_BIAS: tl.constexpr,
                       BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Program (m, n): out[m, n * BLOCK ...] = the sum over slices of float32 partial [SLICES, M, N] (+ bias)."""
    wait_for_inputs(PDL)
    row = tl.program_id(0)
    num_rows = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(SLICES):
        acc += tl.load(partial_ptr + (s * num_rows + row).to(tl.int64) * N + cols, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    tl.store(out_ptr + row.to(tl.int64) * out_row_stride + cols, round_to_dtype(acc, dtype).to(dtype), mask=ok)


@triton.jit
def _quant_gemv_kernel(
    x_ptr, blocks_ptr, bias_ptr, out_ptr, M, N, x_row_stride, row_bytes,
    QTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr, TYPE_SIZE: tl.constexpr, GROUPS: tl.constexpr,
    LANES: tl.constexpr, NUM_GROUPS: tl.constexpr, SPLIT_GROUPS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (n, s): out[:, n * BLOCK_N : (n + 1) * BLOCK_N] for all M rows over groups [s * SPLIT_GROUPS,
    (s + 1) * SPLIT_GROUPS) of K; with several slices, out is float32 [slices, M, N] and s writes out[s]. Tiles are
    4-d: (row of x, row of W, group, lane), so that one decoded weight tile broadcasts over the rows of x."""
    wait_for_inputs(PDL)
    pid = tl.program_id(0)
    g_start = tl.program_id(1) * SPLIT_GROUPS
    out_ptr += tl.program_id(1) * M * N
    rows = tl.arange(0, BLOCK_M)[:, None, None, None]  # (BM, 1, 1, 1)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)[None, :, None, None]  # (1, BN, 1, 1)
    lane = tl.arange(0, LANES)[None, None, None, :]  # (1, 1, 1, L)
    row_ok, col_ok = rows < M, cols < N
    row_offset = cols.to(tl.int64) * row_bytes
    nb = row_bytes // TYPE_SIZE
    x_row = x_ptr + rows * x_row_stride

    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_G, 1], tl.float32)
    for g0 in range(g_start, tl.minimum(g_start + SPLIT_GROUPS, NUM_GROUPS), BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)[None, None, :, None]  # (1, 1, BG, 1)
        g_ok = g < NUM_GROUPS
        f_lo, f_hi, a_lo, b_lo, a_hi, b_hi, col_lo, col_hi = decode_codes(
            blocks_ptr, row_offset, nb, g, lane, col_ok & g_ok, QTYPE, BLOCK_SIZE, GROUPS, LANES)
        x_lo = tl.load(x_row + col_lo, mask=row_ok & g_ok, other=0.0).to(tl.float32)  # (BM, 1, BG, L)
        x_hi = tl.load(x_row + col_hi, mask=row_ok & g_ok, other=0.0).to(tl.float32)
        # sum over a group of (a f + b) x = a sum(f x) + b sum(x): one multiply-add per weight and row of x.
        acc += (a_lo * tl.sum(f_lo * x_lo, axis=3, keep_dims=True) + b_lo * tl.sum(x_lo, axis=3, keep_dims=True)
                + a_hi * tl.sum(f_hi * x_hi, axis=3, keep_dims=True) + b_hi * tl.sum(x_hi, axis=3, keep_dims=True))

    store_rows(tl.sum(tl.sum(acc, axis=3), axis=2), bias_ptr, out_ptr, pid, M, N, HAS_BIAS, BLOCK_M, BLOCK_N)


@triton.jit
def store_rows(y, bias_ptr, out_ptr, pid, M, N, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """A GEMV program's float32 sums y (BM, BN) (+ bias) into out[:, pid * BLOCK_N ...], rounded to out's dtype."""
    rows = tl.arange(0, BLOCK_M)[:, None]
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    tl.store(out_ptr + rows * N + cols, round_to_dtype(y, dtype).to(dtype), mask=(rows < M) & (cols < N))
