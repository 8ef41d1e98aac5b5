"""RMSNorm (plain or after the residual add) and SiLU-and-mul on x86 CPUs with AVX-512, float32: cpu_norm.c through
cpu_library.py, one call for all rows instead of torch's several ops per step. Each beside its plain-PyTorch
reference; the kernels keep its rounding points, only the sum of squares' order and exp's last bits differ.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_library import library, unavailable_reason


def _lib():
    lib = library()
    if lib is None:
        raise RuntimeError(f"Braid's CPU kernels are unavailable: {unavailable_reason()}")
    return lib


def _check(x: torch.Tensor, dim: int, name: str = "x") -> None:
    """x must be float32 [rows, dim] on the CPU, contiguous (the kernels read rows one after another)."""
    if x.dtype is not torch.float32 or x.dim() != 2 or x.shape[1] != dim or not x.is_contiguous() or not x.is_cpu:
        raise ValueError(f"{name} must be a contiguous float32 CPU tensor [rows, {dim}], got {x.dtype} "
                         f"{tuple(x.shape)} strides {x.stride()} on {x.device}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x [m, d] float32, contiguous -> w * (x * rsqrt(mean(x^2) + eps)); with `residual` (the same shape), h = x +
    residual first and returns (norm(h), h)."""
    dim = weight.shape[0]
    _check(x, dim)
    if weight.dtype is not torch.float32 or not weight.is_contiguous() or weight.dim() != 1:
        raise ValueError(f"weight must be a contiguous float32 vector, got {weight.dtype} {tuple(weight.shape)}")
    m = x.shape[0]
    y = x.new_empty((m, dim))  # float32 on the CPU, as x (not torch's default dtype or device)
    if residual is None:
        _lib().braid_cpu_rms_norm(x.data_ptr(), weight.data_ptr(), eps, y.data_ptr(), m, dim)
        return y
    _check(residual, dim, "residual")
    if residual.shape[0] != m:
        raise ValueError(f"residual has {residual.shape[0]} rows, x {m}")
    h = x.new_empty((m, dim))
    _lib().braid_cpu_add_rms_norm(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), eps, y.data_ptr(),
                                  h.data_ptr(), m, dim)
    return y, h


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """`rms_norm` in plain PyTorch, operation by operation (transformers' Llama RMSNorm in float32)."""
    h = x if residual is None else x + residual
    y = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))
    return y if residual is None else (y, h)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [m, 2 d] float32, contiguous (gate then up) -> silu(gate) * up [m, d]."""
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"x must be [rows, 2 * d], got {tuple(x.shape)}")
    d = x.shape[1] // 2
    _check(x, 2 * d)
    y = x.new_empty((x.shape[0], d))
    _lib().braid_cpu_silu_mul(x.data_ptr(), y.data_ptr(), x.shape[0], d)
    return y


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """`silu_and_mul` in plain PyTorch."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
