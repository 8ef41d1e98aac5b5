"""GELU of an ungated MLP (GPT-2's c_fc -> gelu -> c_proj), in PyTorch."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from braidinfer.errors import UnsupportedModelError
from braidinfer.layers.plan import KernelPlan

# transformers' ACT2FN names -> F.gelu's `approximate`: "gelu_new" (GPT-2) and "gelu_pytorch_tanh" are the tanh
# approximation 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))); "gelu" is the exact erf form.
GELU_APPROXIMATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


class Gelu(nn.Module):
    """x: [..., d] -> gelu(x): [..., d]; `activation` is a config's activation_function name."""

    def __init__(self, activation: str = "gelu_new"):
        super().__init__()
        if activation not in GELU_APPROXIMATIONS:
            raise UnsupportedModelError(f"activation {activation!r} is not supported "
                                        f"(supported: {', '.join(sorted(GELU_APPROXIMATIONS))})")
        self.approximate = GELU_APPROXIMATIONS[activation]
        self.plan = KernelPlan()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)

    def kernel_path(self) -> str:
        return f"gelu ({self.approximate}): torch"
