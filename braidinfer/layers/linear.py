"""A projection: nn.Linear (same parameters, same checkpoint names) with the GEMV path of braid_kernels/gemv.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from braidinfer.layers.deferred import Deferred, triton_kernels
from braidinfer.layers.plan import GEMV_MAX_ROWS, KernelPlan


class Linear(nn.Linear):
    """y = x @ weight.T (+ bias); x: [T, in_features] or a Deferred norm/activation -> y: [T, out_features].

    On the GEMV plan a step of at most GEMV_MAX_ROWS rows runs a GEMV kernel, which beats cuBLAS at one row (see
    braid_kernels/gemv.py); a Deferred input (the norm or activation before this projection) runs inside that kernel's
    prologue. Otherwise F.linear (cuBLAS on CUDA).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.plan = KernelPlan()

    def forward(self, x: torch.Tensor | Deferred) -> torch.Tensor:
        if isinstance(x, Deferred):  # only made on the GEMV plan, for steps of at most GEMV_MAX_ROWS rows
            return x.project(self.weight, self.bias)
        if self.plan.gemv and x.shape[0] <= GEMV_MAX_ROWS:
            return triton_kernels().gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def kernel_path(self) -> str:
        if self.plan.gemv:
            return f"linear: torch F.linear; steps of <= {GEMV_MAX_ROWS} row: triton gemv"
        return "linear: torch F.linear"
