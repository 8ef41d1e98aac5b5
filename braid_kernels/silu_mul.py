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
from .numerics import LAUNCH_OPTIONS, exp, round_to_dtype

BLOCK = 1024


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """The model's MLP activation. x: [..., 2 * d] (gate, then up) -> [..., d]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, rounding as `silu_and_mul_ref` does.

    x: [..., 2 * d], float32/float16/bfloat16, gate in the first half of the last dimension and up in the second.
    Returns a new tensor [..., d] of x's dtype.
    """
    check_tensor("x", x, FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"x's last dimension must hold gate and up, an even size; got shape {tuple(x.shape)}")
    check_devices(_silu_and_mul_kernel, x=x)
    d = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((rows.shape[0], d), dtype=x.dtype, device=x.device)
    if out.numel() > 0:
        grid = (rows.shape[0], triton.cdiv(d, BLOCK))
        _silu_and_mul_kernel[grid](rows, out, rows.stride(0), out.stride(0), d, BLOCK=BLOCK, num_warps=4,
                                   **LAUNCH_OPTIONS)
    return out.view(*x.shape[:-1], d)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_row_stride, out_row_stride, d, BLOCK: tl.constexpr):
    """Program (row, block): out[row, cols] = silu(x[row, cols]) * x[row, d + cols]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_row_stride + d + cols, mask=mask, other=0.0).to(tl.float32)
    silu = round_to_dtype(tl.math.div_rn(gate, 1.0 + exp(-gate)), dtype)
    tl.store(out_ptr + row * out_row_stride + cols, round_to_dtype(silu * up, dtype).to(dtype), mask=mask)
