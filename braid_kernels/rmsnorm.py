"""RMSNorm, and residual add + RMSNorm, as one Triton kernel beside the PyTorch references it reproduces.

The references are the operations of braidinfer.layers.RMSNorm (transformers' Llama/Qwen3 RMSNorm):

    x32 = x.float(); y = weight * (x32 * rsqrt(mean(x32 ** 2) + eps)).to(x.dtype)

so in bf16 the normalised value is rounded to bf16 *before* the weight multiply, and the product is rounded again.
The kernel rounds at those two points (and at the residual sum), and takes the mean and the rsqrt the way torch does
on the device at hand. Qwen3's k_norm weights reach ~100, which is why the cast order
matters: multiplying in float32 first moves a large share of outputs by one bf16 step. What remains different is the
order in which the squares are summed, which changes the float32 mean by an ulp on some rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_devices, check_same_dtype, check_shape, check_tensor
from .int8_rows import Int8Rows, check_int8_columns, empty_int8_rows, store_int8_runs
from .numerics import launch_options, release_dependents, round_to_dtype, wait_for_inputs

MAX_HIDDEN = 65536  # one program holds a whole row in registers


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm, operation for operation. x: [..., hidden]; weight: [hidden] -> [..., hidden]."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """The decoder layer's `h = h + sublayer(h)` followed by the next RMSNorm -> (rms_norm(h), h)."""
    h = residual + x
    return rms_norm_ref(h, weight, eps), h


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, static_weight: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension, rounding as `rms_norm_ref` does.

    x: [..., hidden], float32/float16/bfloat16; weight: [hidden], x's dtype; eps: added to the mean square.
    static_weight: no kernel that may still be running when this one launches writes `weight` (a model's
    parameter): under programmatic dependent launch the kernel then loads it before waiting for the kernel ahead.
    Returns a new tensor [..., hidden] of x's dtype; x is not modified.
    """
    _check(x, weight, eps)
    out, _ = _launch(x, None, weight, eps, static_weight=static_weight)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                       static_weight: bool = False):
    """h = residual + x (rounded to the activation dtype), then RMSNorm of h, in one pass over memory.

    x (a sublayer's output) and residual (the residual stream): [..., hidden], same dtype; weight: [hidden];
    static_weight as for `rms_norm`.
    Returns (normed, h), both new tensors [..., hidden]: out of place, so x and residual are left intact
    (vLLM's version overwrites its inputs instead; here no caller has to keep track of which tensor now holds what).
    """
    _check(x, weight, eps, residual)
    return _launch(x, residual, weight, eps, static_weight=static_weight)


def rms_norm_int8(x: torch.Tensor, weight: torch.Tensor, eps: float, *, residual: torch.Tensor | None = None,
                  static_weight: bool = False) -> tuple[Int8Rows, torch.Tensor | None]:
    """RMSNorm (after the residual add when `residual` is given) with its output written as int8 runs for the
    integer-dot GEMV (int8_rows.py) instead of a tensor: quantize_rows(rms_norm(x)) in one launch, the same bytes.

    x: [M, hidden] (hidden a multiple of 32), float32/float16/bfloat16; weight: [hidden]; residual: None or like x;
    static_weight as for `rms_norm`.
    Returns (rows, h): the Int8Rows of the normed rows (dtype x's), and h = residual + x as a new tensor (None
    without a residual).
    """
    _check(x, weight, eps, residual)
    if x.dim() != 2:
        raise ValueError(f"x must be [rows, hidden], got shape {tuple(x.shape)}")
    check_int8_columns("x", x.shape[1])
    rows = empty_int8_rows(x.shape[0], x.shape[1], x.dtype, x.device)
    _, h = _launch(x, residual, weight, eps, rows, static_weight=static_weight)
    return rows, h


def _check(x, weight, eps, residual=None) -> None:
    check_tensor("x", x, FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the one normalised)")
    check_tensor("weight", weight, FLOAT_DTYPES, ndim=1)
    check_shape("weight", weight, (x.shape[-1],))
    tensors = {"x": x, "weight": weight}
    if residual is not None:
        check_tensor("residual", residual, FLOAT_DTYPES)
        check_shape("residual", residual, tuple(x.shape))
        tensors["residual"] = residual
    check_same_dtype(**tensors)
    check_devices(_rms_norm_kernel, **tensors)
    if not 0 < x.shape[-1] <= MAX_HIDDEN:
        raise ValueError(f"the normalised dimension must be 1..{MAX_HIDDEN}, got {x.shape[-1]}")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, hidden] with unit stride along hidden (a view when possible)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch(x, residual, weight, eps, int8: Int8Rows | None = None, static_weight: bool = False):
    """-> (normed, h), shaped like x; h is None without a residual. With `int8`, the normed rows are written there
    instead (normed is then None). static_weight: see weight_first."""
    add = residual is not None
    rows = _rows(x)  # (N, hidden)
    residual_rows = _rows(residual) if add else None
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device) if int8 is None else None
    residual_out = torch.empty(rows.shape, dtype=x.dtype, device=x.device) if add else None
    if rows.shape[0] > 0:
        block = max(triton.next_power_of_2(x.shape[-1]), 32)
        slice_cols = int8_slice(rows.shape[0], x.shape[-1]) if int8 is not None else block
        _rms_norm_kernel[(rows.shape[0], block // slice_cols)](
            rows, residual_rows, weight.contiguous(), out, residual_out,
            *(int8[:3] if int8 is not None else (None, None, None)),
            rows.stride(0), residual_rows.stride(0) if add else 0, rows.shape[1], float(eps),
            HIDDEN=x.shape[-1], BLOCK=block, SLICE=slice_cols, ADD_RESIDUAL=add, MEAN_BY_RECIPROCAL=x.is_cuda,
            INT8=int8 is not None, WEIGHT_FIRST=weight_first(weight, static_weight),
            num_warps=min(max(block // 256, 1), 16), **launch_options(rows),
        )
    return (out.view(x.shape) if out is not None else None), (residual_out.view(x.shape) if add else None)


def weight_first(weight: torch.Tensor, static_weight: bool) -> bool:
    """Whether the kernel loads `weight` before its PDL wait: a static weight, unless it needs the copy that makes
    it contiguous (a kernel of this stream, which the wait orders it after)."""
    return static_weight and weight.is_contiguous()


INT8_SLICE = 512  # columns per program of a decode step's int8 norm
INT8_SLICE_ROWS = 8  # rows up to which the int8 norm runs in slices


def int8_slice(num_rows: int, hidden: int) -> int:
    """Columns each program of an int8 norm writes: INT8_SLICE for the few rows of a decode step whose hidden size
    is a larger power-of-two multiple of it, else the whole row. Each program still sums the squares of its whole row
    (the same sum, in the same order, in every program), but rounds and writes only its slice: at hidden 4096 eight
    programs, where one program's int8 runs were the longest part of the step's norm."""
    whole = max(triton.next_power_of_2(hidden), 32)
    if num_rows <= INT8_SLICE_ROWS and hidden == whole and hidden > INT8_SLICE:
        return INT8_SLICE
    return whole


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, q_ptr, dx_ptr, sx_ptr,
    x_row_stride, residual_row_stride, out_row_stride,  # residual_out shares out's layout (contiguous rows)
    eps,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, SLICE: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
    MEAN_BY_RECIPROCAL: tl.constexpr, INT8: tl.constexpr, WEIGHT_FIRST: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (row, s): [optionally h = residual + x, stored], then RMSNorm(h) * weight, stored to out or, with
    INT8, as int8 runs (q, dx, sx; int8_rows.py). With SLICE < BLOCK (INT8 only), program s sums the whole row's
    squares but stores columns [s * SLICE, (s + 1) * SLICE) only (int8_slice). With WEIGHT_FIRST (a weight no kernel
    of the step writes) the weight of those columns is loaded before the PDL wait, while the kernel ahead still runs."""
    if WEIGHT_FIRST:
        weight = tl.load(weight_ptr + tl.program_id(1) * SLICE + tl.arange(0, SLICE),
                         mask=tl.program_id(1) * SLICE + tl.arange(0, SLICE) < HIDDEN, other=0.0).to(tl.float32)
    wait_for_inputs(PDL)
    if INT8:  # int8 rows feed a decode step's GEMV, which starts loading its weights meanwhile
        release_dependents(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    x = _row_input(x_ptr, residual_ptr, row, x_row_stride, residual_row_stride, cols, mask, dtype, ADD_RESIDUAL)
    if SLICE < BLOCK:  # this program's columns, loaded again (from cache) with the row rather than after its sum
        cols = tl.program_id(1) * SLICE + tl.arange(0, SLICE)
        mask = cols < HIDDEN
        x_slice = _row_input(x_ptr, residual_ptr, row, x_row_stride, residual_row_stride, cols, mask, dtype,
                             ADD_RESIDUAL)
    if ADD_RESIDUAL and SLICE == BLOCK:
        tl.store(residual_out_ptr + row * out_row_stride + cols, x.to(dtype), mask=mask)
    scale = rms_scale(tl.sum(x * x, axis=0), HIDDEN, eps, MEAN_BY_RECIPROCAL)
    if SLICE < BLOCK:
        x = x_slice
        if ADD_RESIDUAL:
            tl.store(residual_out_ptr + row * out_row_stride + cols, x.to(dtype), mask=mask)
    x = round_to_dtype(x * scale, dtype)  # x32.to(dtype): rounded before the weight multiply
    if not WEIGHT_FIRST:
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = round_to_dtype(weight * x, dtype)
    if INT8:
        store_int8_runs(tl.reshape(y, (SLICE // 32, 32)), row, tl.program_id(1) * (SLICE // 32), q_ptr, dx_ptr,
                        sx_ptr, HIDDEN, SLICE // 32)
    else:
        tl.store(out_ptr + row * out_row_stride + cols, y.to(dtype), mask=mask)


@triton.jit
def _row_input(x_ptr, residual_ptr, row, x_row_stride, residual_row_stride, cols, mask, dtype: tl.constexpr,
               ADD_RESIDUAL: tl.constexpr):
    """Columns `cols` of the row the norm normalises, as float32: x, or with ADD_RESIDUAL h = residual + x rounded to
    `dtype` (the value the kernel also stores as the new residual)."""
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:
        residual = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = round_to_dtype(residual + x, dtype)
    return x


@triton.jit
def rms_scale(sum_sq, N: tl.constexpr, eps, MEAN_BY_RECIPROCAL: tl.constexpr):
    """rsqrt(mean + eps) from the float32 sum of N squares, with torch's mean: on CUDA it multiplies the sum by a
    correctly rounded 1/N, on the CPU it divides by N (the two differ in the last bit when N is no power of two)."""
    n = tl.full([], N, tl.float32)
    if MEAN_BY_RECIPROCAL:
        mean_sq = sum_sq * tl.math.div_rn(1.0, n)
    else:
        mean_sq = tl.math.div_rn(sum_sq, n)
    return tl.math.rsqrt(mean_sq + eps)  # torch's CUDA rsqrt is the same instruction; on the CPU both are 1 / sqrt
