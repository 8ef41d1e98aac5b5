"""Values left for the next projection's GEMV prologue.

On the GEMV path (KernelPlan.gemv, a step of at most GEMV_MAX_ROWS rows) a norm or activation that feeds a projection
does not run: it returns a `Deferred` holding its inputs, and the projection (braidinfer.layers.Linear) calls
`project`, one kernel that computes the step and the product. The model's code is the same on every path.
"""
from __future__ import annotations

import torch


class Deferred:
    """A step (norm, activation) not computed yet; `project(weight, bias)` computes it followed by x @ weight.T."""

    def project(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


def triton_kernels():
    """The `kernels` package, imported on first use: importing it decorates its Triton functions, which must happen
    after a test sets TRITON_INTERPRET. Calls go through the module's attributes (tests count them there)."""
    import braid_kernels as kernels

    return kernels
