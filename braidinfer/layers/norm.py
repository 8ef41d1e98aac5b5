"""RMSNorm, plain or with the residual add, in PyTorch or through the Triton kernels of braid_kernels/rmsnorm.py.

Numerics follow transformers' Llama/Qwen3 RMSNorm operation by operation (where each cast happens matters in bf16);
the kernels reproduce these rounding points.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from braidinfer.layers.deferred import Deferred, triton_kernels
from braidinfer.layers.plan import GEMV_MAX_ROWS, KernelPlan


class RMSNorm(nn.Module):
    """y = w * (x / rms(x)), computed in float32 and cast back before the weight multiply, as transformers does.

    forward(x) -> y. forward(x, residual) first adds (h = x + residual, in the model dtype; x is the sublayer's
    output, residual the stream) and returns (norm(h), h). x: [..., dim].
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.plan = KernelPlan()
        self.feeds_gemv = False  # set by select_kernels when the output goes straight into a projection

    def forward(self, x: torch.Tensor, residual: torch.Tensor | DeferredResidual | None = None):
        if isinstance(residual, DeferredResidual):
            residual = residual.value()
        if self.feeds_gemv and x.shape[0] <= GEMV_MAX_ROWS:
            deferred = DeferredNorm(self, x, residual)
            return deferred if residual is None else (deferred, DeferredResidual(deferred))
        if self.plan.triton:
            kernels = triton_kernels()
            if residual is None:
                return kernels.rms_norm(x, self.weight, self.eps, static_weight=True)
            return kernels.fused_add_rms_norm(x, residual, self.weight, self.eps, static_weight=True)
        if self.plan.cpu and x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous() and (residual is None or (
                residual.shape == x.shape and residual.dtype == torch.float32 and residual.is_contiguous())):
            from braid_kernels.cpu_norm import rms_norm  # on use: braid_kernels reads TRITON_INTERPRET at import

            return rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        h = x + residual
        return self._norm(h), h

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and x.device.type == "cpu" and self.weight.dtype == torch.float32:
            # One op instead of six, the same float32 values (tests/unit/test_norm_cpu.py): about half the time of
            # the steps below at decode sizes, where each op's dispatch costs more than its arithmetic.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def kernel_path(self) -> str:
        path = "triton rms_norm / fused_add_rms_norm" if self.plan.triton else (
            "braid_kernels/cpu_norm.c rms_norm (float32 rows; else torch)" if self.plan.cpu else "torch")
        if self.feeds_gemv:
            path += f"; steps of <= {GEMV_MAX_ROWS} row: in the next projection's gemv prologue"
        return f"rmsnorm: {path}"


class DeferredNorm(Deferred):
    """RMSNorm(x) or RMSNorm(x + residual), x: [M, dim] with M <= GEMV_MAX_ROWS, left for the next projection."""

    def __init__(self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None):
        self.norm, self.x, self.residual = norm, x, residual
        self.sum: torch.Tensor | None = None  # x + residual, once a kernel has computed it
        self._value = self._int8 = None

    def project(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        kernels, norm = triton_kernels(), self.norm
        if self.residual is None:
            return kernels.rms_norm_gemv(self.x, norm.weight, norm.eps, weight, bias)
        if self.sum is not None:  # a second projection of the same norm: the add is done
            return kernels.rms_norm_gemv(self.sum, norm.weight, norm.eps, weight, bias)
        y, self.sum = kernels.fused_add_rms_norm_gemv(self.x, self.residual, norm.weight, norm.eps, weight, bias)
        return y

    def value(self) -> torch.Tensor:
        if self._value is None:
            kernels, norm = triton_kernels(), self.norm
            if self.residual is None or self.sum is not None:
                self._value = kernels.rms_norm(self.x if self.sum is None else self.sum, norm.weight, norm.eps,
                                               static_weight=True)
            else:
                self._value, self.sum = kernels.fused_add_rms_norm(self.x, self.residual, norm.weight, norm.eps,
                                                                   static_weight=True)
        return self._value

    def int8_rows(self):
        if self._int8 is None:
            kernels, norm = triton_kernels(), self.norm
            if self.residual is None or self.sum is not None:
                self._int8, _ = kernels.rms_norm_int8(self.x if self.sum is None else self.sum, norm.weight, norm.eps,
                                                      static_weight=True)
            else:
                self._int8, self.sum = kernels.rms_norm_int8(self.x, norm.weight, norm.eps, residual=self.residual,
                                                             static_weight=True)
        return self._int8


class DeferredResidual:
    """The residual stream after a DeferredNorm's add: known once a projection has consumed the norm."""

    def __init__(self, norm: DeferredNorm):
        self.norm = norm

    def value(self) -> torch.Tensor:
        if self.norm.sum is None:
            raise RuntimeError("the residual stream was read before the projection that computes it ran")
        return self.norm.sum
