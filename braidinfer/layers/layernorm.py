"""LayerNorm with a bias (GPT-2): y = (x - mean) / sqrt(var + eps) * weight + bias over the last dim, in PyTorch."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from braidinfer.layers.plan import KernelPlan


class LayerNorm(nn.Module):
    """x: [..., dim] -> y: [..., dim]. F.layer_norm as transformers' nn.LayerNorm runs it (same parameters, same
    checkpoint names `weight` / `bias`). PyTorch on every plan: no kernel of braid_kernels/ computes it."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps
        self.plan = KernelPlan()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)

    def kernel_path(self) -> str:
        return "layernorm: torch"
