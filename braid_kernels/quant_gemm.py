"""The fused dequantising GEMM: y = x @ W.T for batches of rows (M > MAX_ROWS), W read as GGML blocks and decoded
in registers, tile by tile, straight into the tensor cores; the dequantised weight never reaches global memory.

Each program owns an output tile of BLOCK_N weight rows x BLOCK_M rows of x, computed transposed (acc [BLOCK_N,
BLOCK_M] = W_tile @ x_tile.T, "swap AB"): the decoded weights are the MMA's A operand, which Hopper's wgmma takes
from registers, and x is the B operand, whose N side may be as narrow as 8, so M = 16 or 32 wastes no MMA rows.
K is walked in steps of BLOCK_G groups (braid_kernels/quant_decode.py's groups, decoded by decode_codes): each
group's weights are a `lo` and a `hi` run of LANES contiguous columns, so a step is two dots, lo and hi, each
against the x columns of its run (contiguous runs, loaded as vectors). The weights are rounded to x's dtype
before the dot and the sums are float32; float32 x multiplies in full float32 precision ("ieee", no tf32).

The programs walk M fastest: the BLOCK_M tiles that share a weight tile run side by side and read it once from
HBM and again from L2.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .numerics import INTERPRETED, round_to_dtype
from .quant_decode import GROUP_LANES, GROUPS_PER_BLOCK, Q4_K, Q5_K, Q6_K, QTYPE_IDS, decode_codes
from .quant_formats import BLOCK_SIZE, TYPE_SIZE


class QuantGemmConfig(NamedTuple):
    """A launch configuration: weight rows and rows of x per program, weights of a row per K step (lo and hi runs
    together), warps and software-pipeline stages."""

    block_n: int
    block_m: int
    block_k: int
    num_warps: int
    num_stages: int


def launch_config(qtype: str, num_rows: int, n: int, num_sms: int = 132) -> QuantGemmConfig:
    """The configuration for x [num_rows, K] @ W[n, K].T on a device of `num_sms` multiprocessors: chosen from
    SASS, not yet timed on a GPU (the reasoning is in the notes at the end of this file)."""
    block_m = min(128, max(16, triton.next_power_of_2(num_rows)))
    m_tiles = triton.cdiv(num_rows, block_m)
    min_block_n = 16 if block_m <= 32 else 64
    block_n = 128
    while block_n > min_block_n and triton.cdiv(n, block_n) * m_tiles < num_sms // 2:
        block_n //= 2
    block_k = 256 if block_n <= 32 else (128 if GROUP_LANES[qtype] == 32 else 64)
    return QuantGemmConfig(block_n, block_m, block_k, num_warps=8 if block_n == 128 else 4, num_stages=3)


def launch_gemm(x: torch.Tensor, blocks: torch.Tensor, qtype: str, bias: torch.Tensor | None, out: torch.Tensor,
                config: QuantGemmConfig | None = None) -> None:
    """out [M, N] = x [M, K] @ W.T (+ bias) with W the weights of blocks [N, row_bytes]; arguments checked."""
    (num_rows, k), n = x.shape, blocks.shape[0]
    if num_rows == 0 or n == 0:
        return
    if config is None:
        num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        config = launch_config(qtype, num_rows, n, num_sms)
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
        f_lo, f_hi, a_lo, b_lo, a_hi, b_hi, _, _ = decode_codes(
            blocks_ptr, row_offset, g[None], lane[None], col_ok & g_ok[None], QTYPE, BLOCK_SIZE, TYPE_SIZE, GROUPS,
            LANES)  # f: (BN, BG, L); a, b: (BN, BG, 1)
        w_lo = a_lo * f_lo + b_lo  # one multiply-add per weight
        w_hi = a_hi * f_hi + b_hi
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


# Notes on launch_config, from the sm_90 SASS of Triton 3.9 (ptxas' registers and spills, instructions in the
# K loop per decoded weight, counted over all threads; no GPU was at hand, so these are the reasoning to check
# with `benchmarks/quant_kernels.py --gemm --gemm-sweep`):
#
# - The decode is the cost, paid once per weight per BLOCK_M tile, against 2 * BLOCK_M tensor-core flops per
#   weight: at BLOCK_M = 128 an SM's 128 instruction slots a cycle and ~4,000 bf16 flops a cycle make ~8 thread
#   instructions per weight as long as the MMA. So BLOCK_M is the next power of two of M up to 128 (at least 16,
#   the narrowest N side that wastes little of an MMA); 256 would halve the decode per output but needs 255
#   registers at BLOCK_N = 128 and spills for Q6_K.
# - BLOCK_N = 128 with 8 warps (two warpgroups, wgmma m64 each), BLOCK_M = 128, 3 stages: no spills, 156-200
#   registers; per weight Q4_K 8.0, Q4_0 9.7, Q5_K 11.3, Q8_0 13.9, Q6_K 19.7 instructions (Q8_0, Q4_0/1 and
#   Q6_K blocks are only 2-byte aligned, so their bytes load 2 at a time and 8 threads share a group's scales,
#   each recomputing them). decode_codes' codes-in-the-mantissa removed the int-to-float conversions (26 I2F +
#   42 I2FP per 64 Q4_K weights a thread with decode_groups; I2F is quarter rate).
# - BLOCK_N halves (down to 64, wgmma's M) while there would be fewer than half as many programs as SMs: the
#   decode is spread over the SMs, not queued behind a few. Below 64 rows of W there is no wgmma; mma.sync with a
#   128-wide x tile costs 25-35 instructions per weight, so BLOCK_N goes to 32 or 16 only for BLOCK_M <= 32, where
#   the GEMM is bound by reading the weights and BLOCK_K = 256 keeps more bytes in flight (Q4_K 16 x 16: 16.7,
#   32 x 16: 10.5 instructions per weight, 80-128 registers).
# - BLOCK_K: two 64-weight groups (128) for Q4_K/Q5_K; 64 for the 16-lane types, whose decode holds more registers
#   per weight (Q6_K at BLOCK_K = 128, BLOCK_M = 128 spills 144 bytes at 4 warps).
# Left for the GPU: split K for M = 64-256 on narrow N (N = 4096 gives 64 programs at BLOCK_N = 64, each decoding
# 64 rows of W serially), BLOCK_M = 256 for M >= 512, and GEMM_MAX_ROWS in braid_kernels/quant.py.
