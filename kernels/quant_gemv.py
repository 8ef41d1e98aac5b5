"""The dequantising GEMV: y = x @ W.T for a few rows of x (decode steps), W read as GGML blocks straight from memory.

At batch 1 a projection is bound by reading its weight, and a Q4_K weight is 3.56x smaller than bf16, so the kernel
must stream the blocks at full bandwidth and keep the decode off the critical path. Each program owns BLOCK_N
weight rows and walks K in steps of BLOCK_G groups (kernels/quant_decode.py): every step loads BLOCK_N x BLOCK_G
runs of 16-32 contiguous bytes (vector loads where the block size keeps them aligned), decodes each group's scales
once, dequantises in registers and accumulates w * x in float32 per (row of x, row of W, group, lane); the sums
over K happen once at the end. x (a few KB) is re-read by every program from L1/L2. There is no split-K: the
configurations below keep at least ~4 programs per SM by shrinking BLOCK_N for narrow N.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .numerics import round_to_dtype
from .quant_decode import GROUP_LANES, GROUPS_PER_BLOCK, QTYPE_IDS, decode_groups
from .quant_formats import BLOCK_SIZE, TYPE_SIZE

MAX_ROWS = 8  # rows of x per launch; larger batches take the GEMM path


class QuantGemvConfig(NamedTuple):
    """A launch configuration: weight rows per program, weights of a row per loop step, warps."""

    block_n: int
    block_k: int
    num_warps: int


def launch_config(qtype: str, num_rows: int, n: int, num_sms: int) -> QuantGemvConfig:
    """The configuration for x [num_rows, K] @ W[n, K].T on a device of `num_sms` multiprocessors.

    Not yet tuned on a GPU (benchmarks/quant_kernels.py --sweep times the neighbours). The reasoning, checked in
    the sm_90 PTX and ptxas' report (Triton 3.9): a step of 4 weight rows x 4096 weights gives each of 8 warps'
    threads 32 contiguous bytes of 4-bit quants (two 16-byte loads; Q8_0, Q6_K: 2-byte loads, their 34/210-byte
    blocks being only 2-aligned) in flight at once, with 80-100 registers and no spills; the scales are loaded one
    group per thread and x once per program, then broadcast through shared memory. block_k shrinks as rows of x
    are added, keeping the float32 accumulator (rows x 4 x block_k / 2 values over 256 threads) at ~32 registers
    (~120 registers in all at 2-8 rows). BLOCK_N drops to 2 or 1 where N / 4 would give fewer than 4 programs per
    SM (k/v projections, N = 1024).
    """
    block_m = triton.next_power_of_2(max(num_rows, 1))
    block_k = max(2 * GROUP_LANES[qtype], 4096 // block_m)
    block_n = 4
    while block_n > 1 and triton.cdiv(n, block_n) < 4 * num_sms:
        block_n //= 2
    return QuantGemvConfig(block_n, block_k, num_warps=8 if block_m * block_n * block_k >= 4096 else 4)


def launch_gemv(x: torch.Tensor, blocks: torch.Tensor, qtype: str, bias: torch.Tensor | None, out: torch.Tensor,
                config: QuantGemvConfig | None = None) -> None:
    """out [M, N] = x [M, K] @ W.T (+ bias) with W the weights of blocks [N, row_bytes]; arguments checked."""
    (num_rows, k), n = x.shape, blocks.shape[0]
    if num_rows == 0 or n == 0:
        return
    if config is None:
        num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        config = launch_config(qtype, num_rows, n, num_sms)
    lanes = GROUP_LANES[qtype]
    num_groups = k // (2 * lanes)
    block_g = min(max(1, config.block_k // (2 * lanes)), triton.next_power_of_2(num_groups))
    _quant_gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, blocks, bias, out, num_rows, n, x.stride(0), blocks.shape[1],
        QTYPE=QTYPE_IDS[qtype], BLOCK_SIZE=BLOCK_SIZE[qtype], TYPE_SIZE=TYPE_SIZE[qtype],
        GROUPS=GROUPS_PER_BLOCK[qtype], LANES=lanes, NUM_GROUPS=num_groups, HAS_BIAS=bias is not None,
        BLOCK_M=triton.next_power_of_2(num_rows), BLOCK_N=config.block_n, BLOCK_G=block_g,
        num_warps=config.num_warps,
    )


@triton.jit
def _quant_gemv_kernel(
    x_ptr, blocks_ptr, bias_ptr, out_ptr, M, N, x_row_stride, row_bytes,
    QTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr, TYPE_SIZE: tl.constexpr, GROUPS: tl.constexpr,
    LANES: tl.constexpr, NUM_GROUPS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Program n: out[:, n * BLOCK_N : (n + 1) * BLOCK_N] for all M rows. Tiles are 4-d: (row of x, row of W,
    group, lane), so that one decoded weight tile broadcasts over the rows of x."""
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)[:, None, None, None]  # (BM, 1, 1, 1)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)[None, :, None, None]  # (1, BN, 1, 1)
    lane = tl.arange(0, LANES)[None, None, None, :]  # (1, 1, 1, L)
    row_ok, col_ok = rows < M, cols < N
    row_offset = cols.to(tl.int64) * row_bytes
    x_row = x_ptr + rows * x_row_stride

    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_G, LANES], tl.float32)
    for g0 in range(0, NUM_GROUPS, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)[None, None, :, None]  # (1, 1, BG, 1)
        g_ok = g < NUM_GROUPS
        w_lo, w_hi, col_lo, col_hi = decode_groups(blocks_ptr, row_offset, g, lane, col_ok & g_ok,
                                                   QTYPE, BLOCK_SIZE, TYPE_SIZE, GROUPS, LANES)
        x_lo = tl.load(x_row + col_lo, mask=row_ok & g_ok, other=0.0).to(tl.float32)  # (BM, 1, BG, L)
        x_hi = tl.load(x_row + col_hi, mask=row_ok & g_ok, other=0.0).to(tl.float32)
        acc += w_lo * x_lo + w_hi * x_hi

    y = tl.sum(tl.sum(acc, axis=3), axis=2)  # (BM, BN)
    rows2 = tl.arange(0, BLOCK_M)[:, None]
    cols2 = pid * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols2, mask=cols2 < N, other=0.0).to(tl.float32)
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    tl.store(out_ptr + rows2 * N + cols2, round_to_dtype(y, dtype).to(dtype), mask=(rows2 < M) & (cols2 < N))
