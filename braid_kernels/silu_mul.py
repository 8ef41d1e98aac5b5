"""SwiGLU's activation, silu(gate) * up, read from the fused gate_up projection in one pass.

The reference is the MLP of braidinfer.models.llama: `gate, up = gate_up_proj(x).chunk(2, dim=-1)` (gate first, as
the loader packs gate_proj before up_proj), then `silu(gate) * up`. In bf16 torch rounds twice: silu's result
(computed in float32 as g / (1 + expf(-g))) and the product. The kernel rounds at the same two points and computes
silu with the same expf and exact division, so on CUDA it matches torch bit for bit; under the interpreter numpy's
exp can differ from torch's CPU exp in the last float32 bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_devices, check_tensor
from .int8_rows import Int8Rows, check_int8_columns, empty_int8_rows, store_int8_runs
from .numerics import exp, launch_options, release_dependents, round_to_dtype, wait_for_inputs

BLOCK = 1024
INT8_BLOCK = 256  # columns per program when writing int8 runs (a decode step's one row: more, smaller programs)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """The model's MLP activation. x: [..., 2 * d] (gate, then up) -> [..., d]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, rounding as `silu_and_mul_ref` does.

    x: [..., 2 * d], float32/float16/bfloat16, gate in the first half of the last dimension and up in the second.
    Returns a new tensor [..., d] of x's dtype.
    """
    rows = _check(x)
    d = rows.shape[1] // 2
    out = torch.empty((rows.shape[0], d), dtype=x.dtype, device=x.device)
    _launch(rows, out, None)
    return out.view(*x.shape[:-1], d)


def silu_and_mul_int8(x: torch.Tensor) -> Int8Rows:
    """silu(gate) * up written as int8 runs for the integer-dot GEMV (int8_rows.py) instead of a tensor:
    quantize_rows(silu_and_mul(x)) in one launch, the same bytes. x: [M, 2 * d], d a multiple of 32."""
    rows = _check(x)
    if x.dim() != 2:
        raise ValueError(f"x must be [rows, 2 * d], got shape {tuple(x.shape)}")
    check_int8_columns("silu_and_mul's output", rows.shape[1] // 2)
    int8 = empty_int8_rows(rows.shape[0], rows.shape[1] // 2, x.dtype, x.device)
    _launch(rows, None, int8)
    return int8


def _check(x: torch.Tensor) -> torch.Tensor:
    """x checked -> x as [rows, 2 * d] with unit stride along the last dimension."""
    check_tensor("x", x, FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"x's last dimension must hold gate and up, an even size; got shape {tuple(x.shape)}")
    check_devices(_silu_and_mul_kernel, x=x)
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch(rows: torch.Tensor, out: torch.Tensor | None, int8: Int8Rows | None) -> None:
    """The kernel over rows [M, 2 * d]: out, or int8's runs. The int8 form (a one-row decode step's MLP, at
    d = 14336 on an H100) took 1.33 us per call in programs of 256 columns against 1.66 us in programs of 1024."""
    d = rows.shape[1] // 2
    if rows.shape[0] and d:
        block = BLOCK if int8 is None else INT8_BLOCK
        grid = (rows.shape[0], triton.cdiv(d, block))
        _silu_and_mul_kernel[grid](rows, out, *(int8[:3] if int8 is not None else (None, None, None)),
                                   rows.stride(0), d, BLOCK=block, INT8=int8 is not None, num_warps=4,
                                   **launch_options(rows))


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, q_ptr, dx_ptr, sx_ptr, x_row_stride, d, BLOCK: tl.constexpr,
                         INT8: tl.constexpr, PDL: tl.constexpr):
    """Program (row, block): out[row, cols] = silu(x[row, cols]) * x[row, d + cols] (out: contiguous [M, d]), or
    with INT8 those columns as int8 runs (q, dx, sx; int8_rows.py)."""
    wait_for_inputs(PDL)
    if INT8:  # int8 rows feed a decode step's GEMV, which starts loading its weights meanwhile
        release_dependents(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_row_stride + d + cols, mask=mask, other=0.0).to(tl.float32)
    silu = round_to_dtype(tl.math.div_rn(gate, 1.0 + exp(-gate)), dtype)
    y = round_to_dtype(silu * up, dtype)
    if INT8:
        y = tl.reshape(y, (BLOCK // 32, 32))
        store_int8_runs(y, tl.program_id(0), tl.program_id(1) * (BLOCK // 32), q_ptr, dx_ptr, sx_ptr, d, BLOCK // 32)
    else:
        tl.store(out_ptr + row * d + cols, y.to(dtype), mask=mask)
