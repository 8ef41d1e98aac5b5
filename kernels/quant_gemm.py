"""The fused dequantising GEMM: y = x @ W.T for batches of rows (M > MAX_ROWS), W read as GGML blocks and decoded
in registers, tile by tile, straight into the tensor cores; the dequantised weight never reaches global memory.

Each program owns an output tile of BLOCK_N weight rows x BLOCK_M rows of x, computed transposed (acc [BLOCK_N,
BLOCK_M] = W_tile @ x_tile.T, "swap AB"): the decoded weights are the MMA's A operand, which Hopper's wgmma takes
from registers, and x is the B operand, whose N side may be as narrow as 8, so M = 16 or 32 wastes no MMA rows.
K is walked in steps of BLOCK_G groups (kernels/quant_decode.py): decode_groups gives each group's weights as a
`lo` and a `hi` run of LANES contiguous columns, so a step is two dots, lo and hi, each against the x columns of
its run (contiguous runs, loaded as vectors). The weights are rounded to x's dtype before the dot and the sums are
float32; float32 x multiplies in full float32 precision ("ieee", no tf32).

The programs walk M fastest: the BLOCK_M tiles that share a weight tile run side by side and read it once from
HBM and again from L2.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .numerics import INTERPRETED, round_to_dtype
from .quant_decode import GROUP_LANES, GROUPS_PER_BLOCK, Q4_K, Q5_K, Q6_K, QTYPE_IDS, decode_groups
from .quant_formats import BLOCK_SIZE, TYPE_SIZE


class QuantGemmConfig(NamedTuple):
    """A launch configuration: weight rows and rows of x per program, weights of a row per K step (lo and hi runs
    together), warps and software-pipeline stages."""

    block_n: int
    block_m: int
    block_k: int
    num_warps: int
    num_stages: int


def launch_config(qtype: str, num_rows: int, n: int) -> QuantGemmConfig:
    """The configuration for x [num_rows, K] @ W[n, K].T; see the module notes at the end for the reasoning."""
    block_m = min(128, max(16, triton.next_power_of_2(num_rows)))
    block_k = 128 if GROUP_LANES[qtype] == 16 else 128
    return QuantGemmConfig(block_n=128 if block_m <= 64 else 64, block_m=block_m, block_k=block_k, num_warps=4,
                           num_stages=3)


def launch_gemm(x: torch.Tensor, blocks: torch.Tensor, qtype: str, bias: torch.Tensor | None, out: torch.Tensor,
                config: QuantGemmConfig | None = None) -> None:
    """out [M, N] = x [M, K] @ W.T (+ bias) with W the weights of blocks [N, row_bytes]; arguments checked."""
    (num_rows, k), n = x.shape, blocks.shape[0]
    if num_rows == 0 or n == 0:
        return
    config = config or launch_config(qtype, num_rows, n)
    lanes = GROUP_LANES[qtype]
    num_groups = k // (2 * lanes)
    block_g = max(1, config.block_k // (2 * lanes))
    grid = (triton.cdiv(num_rows, config.block_m), triton.cdiv(n, config.block_n))
    _quant_gemm_kernel[grid](
        x, blocks, bias, out, num_rows, n, x.stride(0), blocks.shape[1],
        QTYPE=QTYPE_IDS[qtype], BLOCK_SIZE=BLOCK_SIZE[qtype], TYPE_SIZE=TYPE_SIZE[qtype],
        GROUPS=GROUPS_PER_BLOCK[qtype], LANES=lanes, NUM_GROUPS=num_groups, HAS_BIAS=bias is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_G=block_g,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


@triton.jit
def _group_columns(g, lane, QTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr, GROUPS: tl.constexpr):
    """Columns of the lo run of groups g (decode_groups' col_lo), and the constant stride to the hi run."""
    c = g % GROUPS
    col = (g // GROUPS) * BLOCK_SIZE + lane
    if QTYPE == Q4_K or QTYPE == Q5_K:  # Q4_K, Q5_K: sub-block pairs of 64
        return col + c * 64, 32
    elif QTYPE == Q6_K:  # Q6_K: (half, quarter) of 128-weight halves
        return col + (c // 4) * 128 + (c % 4) * 16, 64
    else:  # Q8_0, Q4_0, Q4_1: one group of 16 + 16 per block
        return col, 16


@triton.jit
def _quant_gemm_kernel(
    x_ptr, blocks_ptr, bias_ptr, out_ptr, M, N, x_row_stride, row_bytes,
    QTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr, TYPE_SIZE: tl.constexpr, GROUPS: tl.constexpr,
    LANES: tl.constexpr, NUM_GROUPS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Program (m, n): out[m * BLOCK_M : (m + 1) * BLOCK_M, n * BLOCK_N : (n + 1) * BLOCK_N]. Weight tiles are
    (row of W, group, lane), flattened to (row of W, group * lane) for the dot; x tiles (group * lane, row of x)."""
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    row_offset = cols.to(tl.int64)[:, None, None] * row_bytes  # (BN, 1, 1)
    col_ok = (cols < N)[:, None, None]
    lane = tl.arange(0, LANES)[None, :]  # (1, L)
    x_rows = x_ptr + rows[None, :].to(tl.int64) * x_row_stride  # (1, BM)
    row_ok = (rows < M)[None, :]

    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for g0 in range(0, NUM_GROUPS, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)[:, None]  # (BG, 1)
        g_ok = g < NUM_GROUPS
        w_lo, w_hi, _, _ = decode_groups(blocks_ptr, row_offset, g[None], lane[None], col_ok & g_ok[None],
                                         QTYPE, BLOCK_SIZE, TYPE_SIZE, GROUPS, LANES)  # (BN, BG, L)
        col_lo, hi_stride = _group_columns(g, lane, QTYPE, BLOCK_SIZE, GROUPS)  # (BG, L)
        k_lo = tl.reshape(col_lo, (BLOCK_G * LANES, 1))  # (BG * L, 1)
        k_ok = tl.reshape(g_ok & (lane >= 0), (BLOCK_G * LANES, 1)) & row_ok
        x_lo = tl.load(x_rows + k_lo, mask=k_ok, other=0.0)  # (BG * L, BM)
        x_hi = tl.load(x_rows + k_lo + hi_stride, mask=k_ok, other=0.0)
        acc = _dot(_to_dtype(w_lo, dtype), x_lo, acc, BLOCK_N, BLOCK_G * LANES)
        acc = _dot(_to_dtype(w_hi, dtype), x_hi, acc, BLOCK_N, BLOCK_G * LANES)

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
def _dot(w, x, acc, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += w [BN, BG, L] flattened to [BN, BK] @ x [BK, BM]; float32 x in full precision."""
    w = tl.reshape(w, (BLOCK_N, BLOCK_K))
    if INTERPRETED or x.dtype == tl.float32:
        # The interpreter (Triton 3.9) multiplies bf16 operands as their raw uint16 bits: widen them first (exact).
        return tl.dot(w.to(tl.float32), x.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(w, x, acc)
