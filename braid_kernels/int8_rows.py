"""x rounded to int8 per run of 32 columns: the form in which the integer-dot GEMV (quant_dot.py) takes its input.

Each run of 32 columns of a row is stored as 127 levels of its largest magnitude, rounded half away from zero as
llama.cpp's q8_1 activations are:

    dx = max|x| / 127,   q = round(x * (127 / max|x|)),   sx = dx * sum(q) per half run (16 columns)

`quantize_rows` computes them from a tensor (one extra launch before each GEMV). `store_int8_runs` is the same
computation as a device function, so that the kernel producing x (an RMSNorm, SiLU-and-mul, the decode attention:
rmsnorm.py, silu_mul.py, decode_attention.py) can write it in this form directly and the GEMV needs no launch of its
own; both round identically (the same device function, no mul+add contraction), so the fused and the separate paths
give the same bytes.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._checks import check_shape, check_tensor
from .numerics import launch_options, release_dependents, wait_for_inputs

WIDTH = 32  # columns per int8 scale
HALF = WIDTH // 2  # columns per entry of sx: the shortest run of weight codes that share an offset


class Int8Rows(NamedTuple):
    """x [M, K] as int8 runs: q int8 [M, K]; dx float32 [M, K / 32], the scale of each run; sx float32 [M, K / 16],
    dx * sum(q) over each half run; dtype: x's dtype (that of the products computed from it)."""

    q: torch.Tensor
    dx: torch.Tensor
    sx: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        """[M, K], as x's."""
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device

    def dequantize(self) -> torch.Tensor:
        """q * dx as float32 [M, K]: the values the integer-dot products are exact for."""
        m, k = self.q.shape
        return (self.q.float().view(m, k // WIDTH, WIDTH) * self.dx[:, :, None]).view(m, k)


def empty_int8_rows(num_rows: int, k: int, dtype: torch.dtype, device: torch.device | str) -> Int8Rows:
    """Uninitialised Int8Rows for [num_rows, k] (k a multiple of 32), to be written by a kernel."""
    return Int8Rows(torch.empty((num_rows, k), dtype=torch.int8, device=device),
                    torch.empty((num_rows, k // WIDTH), dtype=torch.float32, device=device),
                    torch.empty((num_rows, k // HALF), dtype=torch.float32, device=device), dtype)


def check_int8_rows(name: str, rows: Int8Rows, num_rows: int, k: int) -> None:
    """rows is the Int8Rows of [num_rows, k] as empty_int8_rows / quantize_rows make them: q int8 [num_rows, k],
    dx and sx float32 [num_rows, k / 32] and [num_rows, k / 16], contiguous, q 4-byte aligned."""
    for field, t, dtype, cols in (("q", rows.q, torch.int8, k), ("dx", rows.dx, torch.float32, k // WIDTH),
                                  ("sx", rows.sx, torch.float32, k // HALF)):
        check_tensor(f"{name}.{field}", t, (dtype,), ndim=2)
        check_shape(f"{name}.{field}", t, (num_rows, cols))
    if not all(t.is_contiguous() for t in rows[:3]) or rows.q.data_ptr() % 4:
        raise ValueError(f"{name}'s int8 rows must be contiguous tensors, q 4-byte aligned (as quantize_rows makes "
                         f"them)")


def check_int8_columns(name: str, k: int) -> None:
    """int8 runs need whole runs of 32 columns."""
    if k % WIDTH:
        raise ValueError(f"{name} must have a multiple of {WIDTH} columns to be rounded to int8 runs, got {k}")


def quantize_rows_ref(x: torch.Tensor) -> Int8Rows:
    """The rounding in PyTorch (float32), for the tests: x [M, K] -> Int8Rows."""
    m, k = x.shape
    runs = x.float().view(m, k // WIDTH, WIDTH)
    amax = runs.abs().amax(dim=-1)
    # an exact division, as the kernel's (torch computes `127.0 / t` as 127 * (1 / t), rounding twice)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax.clamp_min(1e-30), torch.zeros_like(amax))
    scaled = runs * inv[:, :, None]
    q = torch.where(scaled >= 0, torch.floor(scaled + 0.5), -torch.floor(0.5 - scaled))
    dx = amax / torch.full_like(amax, 127.0)  # exact too (torch's CUDA `t / 127.0` multiplies by 1 / 127)
    sx = dx.repeat_interleave(2, dim=1) * q.view(m, k // HALF, HALF).sum(dim=-1)
    return Int8Rows(q.to(torch.int8).view(m, k), dx, sx, x.dtype)


def quantize_rows(x: torch.Tensor) -> Int8Rows:
    """x [M, K] (float32/float16/bfloat16, K a multiple of 32, unit stride along K) -> its Int8Rows, one launch."""
    check_tensor("x", x, (torch.float32, torch.float16, torch.bfloat16), ndim=2)
    m, k = x.shape
    check_int8_columns("x", k)
    if x.stride(1) != 1:
        x = x.contiguous()
    rows = empty_int8_rows(m, k, x.dtype, x.device)
    runs = 16
    if m and k:
        _quantize_rows_kernel[(m, triton.cdiv(k // WIDTH, runs))](
            x, rows.q, rows.dx, rows.sx, x.stride(0), k, RUNS=runs, num_warps=2, **launch_options(x))
    return rows


@triton.jit
def store_int8_runs(x, row, first_run, q_ptr, dx_ptr, sx_ptr, K, RUNS: tl.constexpr):
    """Writes runs [first_run, first_run + RUNS) of row `row` of an Int8Rows [M, K] from x, a float32 (RUNS, 32)
    tile of those columns (runs at or past K are not written)."""
    run = first_run + tl.arange(0, RUNS)
    col = run[:, None] * 32 + tl.arange(0, 32)[None, :]
    ok = col < K
    amax = tl.max(tl.abs(x), axis=1)
    d = tl.math.div_rn(amax, 127.0)  # exact divisions, as torch's (Triton's `/` is approximate on the GPU)
    inv = tl.where(amax > 0, tl.math.div_rn(127.0, tl.maximum(amax, 1e-30)), 0.0)
    q = x * inv[:, None]
    q = tl.where(q >= 0, tl.floor(q + 0.5), -tl.floor(0.5 - q))  # round half away from zero, as llama.cpp
    row = row.to(tl.int64)
    tl.store(q_ptr + row * K + col, q.to(tl.int8), mask=ok)
    tl.store(dx_ptr + row * (K // 32) + run, d, mask=run * 32 < K)
    halves = tl.sum(tl.reshape(q, (RUNS, 2, 16)), axis=2)  # (RUNS, 2)
    half = 2 * run[:, None] + tl.arange(0, 2)[None, :]
    tl.store(sx_ptr + row * (K // 16) + half, d[:, None] * halves, mask=run[:, None] * 32 < K)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, dx_ptr, sx_ptr, x_row_stride, K, RUNS: tl.constexpr, PDL: tl.constexpr):
    """Program (row, r): runs [r * RUNS, (r + 1) * RUNS) of 32 columns of one row of x."""
    wait_for_inputs(PDL)
    release_dependents(PDL)  # the decode step's GEMV after this kernel starts loading its weights
    row = tl.program_id(0)
    first_run = tl.program_id(1) * RUNS
    col = (first_run + tl.arange(0, RUNS))[:, None] * 32 + tl.arange(0, 32)[None, :]
    x = tl.load(x_ptr + row.to(tl.int64) * x_row_stride + col, mask=col < K, other=0.0).to(tl.float32)
    store_int8_runs(x, row, first_run, q_ptr, dx_ptr, sx_ptr, K, RUNS)
