"""Gated activations of the MLP: x = [gate | up] -> act(gate) * up.

SiluAndMul (Llama, Qwen, Mistral: SwiGLU) runs in PyTorch, through braid_kernels/silu_mul.py, or, before a projection on the
GEMV path, inside that projection's kernel. GeluAndMul (Gemma's GeGLU, tanh approximation) runs in PyTorch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from braidinfer.layers.deferred import Deferred, triton_kernels
from braidinfer.layers.plan import GEMV_MAX_ROWS, KernelPlan


class SiluAndMul(nn.Module):
    """x: [..., 2 * d] (gate then up, as the packed gate_up projection writes them) -> silu(gate) * up: [..., d]."""

    def __init__(self):
        super().__init__()
        self.plan = KernelPlan()
        self.feeds_gemv = False  # set by select_kernels when the output goes straight into a projection

    def forward(self, x: torch.Tensor) -> torch.Tensor | DeferredSiluAndMul:
        if self.feeds_gemv and x.shape[0] <= GEMV_MAX_ROWS:
            return DeferredSiluAndMul(x)
        if self.plan.triton:
            return triton_kernels().silu_and_mul(x)
        if self.plan.cpu and x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous():
            from braid_kernels.cpu_norm import silu_and_mul  # on use: braid_kernels reads TRITON_INTERPRET at import

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def kernel_path(self) -> str:
        path = "triton silu_and_mul" if self.plan.triton else (
            "braid_kernels/cpu_norm.c silu_and_mul (float32 rows; else torch)" if self.plan.cpu else "torch")
        if self.feeds_gemv:
            path += f"; steps of <= {GEMV_MAX_ROWS} row: in the next projection's gemv prologue"
        return f"silu_and_mul: {path}"


class DeferredSiluAndMul(Deferred):
    """silu(gate) * up of x [M, 2 * d], M <= GEMV_MAX_ROWS, left for the next projection."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self._value = self._int8 = None

    def project(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return triton_kernels().silu_and_mul_gemv(self.x, weight, bias)

    def value(self) -> torch.Tensor:
        if self._value is None:
            self._value = triton_kernels().silu_and_mul(self.x)
        return self._value

    def int8_rows(self):
        if self._int8 is None:
            self._int8 = triton_kernels().silu_and_mul_int8(self.x)
        return self._int8


class GeluAndMul(nn.Module):
    """x: [..., 2 * d] (gate then up) -> gelu(gate) * up: [..., d]; approximate "tanh" (Gemma's gelu_pytorch_tanh)
    or "none" (the erf form). PyTorch on every plan: no kernel of braid_kernels/ computes it yet."""

    def __init__(self, approximate: str = "tanh"):
        super().__init__()
        if approximate not in ("tanh", "none"):
            raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
        self.approximate = approximate
        self.plan = KernelPlan()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate=self.approximate) * up

    def kernel_path(self) -> str:
        return f"gelu_and_mul ({self.approximate}): torch"
