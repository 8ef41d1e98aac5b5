"""Argument checks shared by the kernel launchers: a wrong shape, dtype or device is a ValueError that names the
argument, raised before Triton sees it."""
from __future__ import annotations

import torch

from .numerics import is_interpreted

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, t, dtypes: tuple[torch.dtype, ...], ndim: int | None = None) -> None:
    """`t` is a tensor of one of `dtypes` with `ndim` dimensions (any number when None)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must have dtype {allowed}; got {str(t.dtype).removeprefix('torch.')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {tuple(t.shape)}")


def check_float_dtype(name: str, dtype) -> None:
    """`dtype` is one of FLOAT_DTYPES (an argument naming an output dtype)."""
    if dtype not in FLOAT_DTYPES:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
        raise ValueError(f"{name} must be one of {allowed}; got {dtype!r}")


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_same_dtype(**tensors: torch.Tensor) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{name} {str(d).removeprefix('torch.')}" for name, d in dtypes.items())
        raise ValueError(f"dtypes must match: {listed}")


def check_devices(kernel, **tensors: torch.Tensor) -> None:
    """All tensors on one device, and a CUDA one unless `kernel` runs in Triton's interpreter."""
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        listed = ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
        raise ValueError(f"tensors must be on one device: {listed}")
    device = devices.pop()
    if device.type != "cuda" and not is_interpreted(kernel):
        raise ValueError(f"Triton kernels need CUDA tensors, got {device} ones "
                         "(set TRITON_INTERPRET=1 before importing kernels to run them on the CPU)")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")


def check_linear_inputs(kernel, x: torch.Tensor, k: int, n: int, bias: torch.Tensor | None, weights_name: str,
                        weights: torch.Tensor, weights_desc: str) -> None:
    """A quantised linear's x and bias: x [M, k] of a float dtype with unit stride along K (the error names the
    weights as `weights_desc`), bias [n] of x's dtype or None, and both on the weights' device, one `kernel` runs
    on (see check_devices)."""
    check_tensor("x", x, FLOAT_DTYPES, ndim=2)
    if x.shape[1] != k:
        raise ValueError(f"x must have {k} columns for {weights_desc}, got {tuple(x.shape)}")
    check_last_dim_contiguous("x", x)
    tensors = {"x": x, weights_name: weights}
    if bias is not None:
        check_tensor("bias", bias, (x.dtype,), ndim=1)
        check_shape("bias", bias, (n,))
        tensors["bias"] = bias
    check_devices(kernel, **tensors)
