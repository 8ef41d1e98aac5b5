"""Values left for the next projection's GEMV prologue.

On the GEMV path (KernelPlan.gemv, a step of at most GEMV_MAX_ROWS rows) a norm or activation that feeds a projection
does not run: it returns a `Deferred` holding its inputs, and the projection computes it. A braidinfer.layers.Linear
calls `project`, one kernel that computes the step and the product; a QuantLinear (weights kept quantised) calls
`int8_rows`, the step's kernel writing its output as the int8 runs its integer-dot GEMV reads (one launch fewer),
or `value` where it needs the plain tensor. The model's code is the same on every path. The attention's output
(layers/attention.py AttentionOutput) takes the same form with nothing left to compute: its kernel wrote the tensor
and the int8 rows already.
"""
from __future__ import annotations

import torch


class Deferred:
    """A step (norm, activation) not computed yet, of the input `x` [M, ...]: `project(weight, bias)` computes it
    followed by x @ weight.T; `value()` computes it alone; `int8_rows()` computes it as braid_kernels' Int8Rows.
    `value` and `int8_rows` keep their result, so several QuantLinears of one step compute it once (`project` fuses
    the step into each projection's kernel instead)."""

    x: torch.Tensor

    def project(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def value(self) -> torch.Tensor:
        raise NotImplementedError

    def int8_rows(self):
        raise NotImplementedError


def triton_kernels():
    """The `kernels` package, imported on first use: importing it decorates its Triton functions, which must happen
    after a test sets TRITON_INTERPRET. Calls go through the module's attributes (tests count them there)."""
    import braid_kernels as kernels

    return kernels
