"""Gemma's RMSNorm: y = x / rms(x) * (1 + w), all in float32 and rounded once at the end.

Not the Llama RMSNorm with a shifted weight: transformers' Gemma2RMSNorm / Gemma3RMSNorm multiply by (1 + w) in
float32 before casting back (Llama casts first, then multiplies in the model dtype; huggingface/transformers#29402),
so in bf16 the two round differently. It has no `plan` and no `feeds_gemv` attribute on purpose: the Triton
rms_norm kernels, the fused add + norm and the GEMV prologue all compute Llama's rounding, so `select_kernels`
leaves this layer on its PyTorch path on every plan.
"""
from __future__ import annotations

import torch
from torch import nn


class GemmaRMSNorm(nn.Module):
    """x: [..., dim] -> x / sqrt(mean(x^2) + eps) * (1 + weight), computed in float32, returned in x's dtype.

    weight is stored as in Hugging Face checkpoints (zero-centred: 0 means the identity scale).
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)

    def kernel_path(self) -> str:
        return "gemma_rmsnorm: torch (float32, (1 + w)); no triton kernel computes this rounding"
