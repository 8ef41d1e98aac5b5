"""A projection whose weight stays as GGUF blocks: the layer that replaces a Linear when the checkpoint holds that
weight quantised (weights.load_model swaps the module; the model's code is unchanged)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from braidinfer.loader.quantized import QuantizedTensor


class QuantLinear(nn.Module):
    """y = x @ W.T (+ bias) with W [out_features, in_features] held as row ranges ("parts"), each GGUF blocks of one
    qtype or a float matrix (a tensor the loader had to dequantise).

    A fused projection (q/k/v, gate/up) is filled part by part; `finalize` joins neighbouring parts of the same
    qtype into one matrix of blocks, so a projection whose checkpoint tensors share a type runs one kernel, and one
    mixing types (Q4_K_M's Q4_K q/k beside a Q6_K v) runs one per type, concatenated.

    Paths: CUDA: braid_kernels.quant.quant_linear (dequantising GEMV up to 8 rows, else dequantise + matmul).
    CPU: blocks are dequantised per call by the PyTorch decoder (never Triton), unless `finalize(materialize=True)`
    decoded them once into a float matrix. The engine materialises on the CPU: torch 2.13's weight-only CPU matmuls
    (`_weight_int4pack_mm_for_cpu`, which could take Q4_0/Q4_1 exactly, and `_weight_int8pack_mm`) measured 10-20x
    slower than float32 F.linear for one row of SmolLM2-135M's shapes on an AVX2 machine, and decoding per call
    slower still. Takes plain tensors only: plan.gemv_prologues fuses no norm into it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self._pending: dict[int, torch.Tensor | QuantizedTensor] = {}  # first row -> part, until finalize
        self.qtypes: list[str | None] = []  # per part (buffer part{i}); None: a float matrix

    def set_part(self, start: int, weight: torch.Tensor | QuantizedTensor) -> None:
        """Rows [start, start + rows) of W: blocks (QuantizedTensor) or a float [rows, in_features] tensor."""
        rows, cols = weight.shape
        if cols != self.in_features or start < 0 or start + rows > self.out_features:
            raise ValueError(f"a [{rows}, {cols}] part at row {start} does not fit a [{self.out_features}, "
                             f"{self.in_features}] projection")
        self._pending[start] = weight

    def finalize(self, materialize: bool = False) -> None:
        """Checks the parts cover every row once and lays them out for computing; call after the last set_part.
        materialize: decode every part now into one float matrix of `dtype` (gguf's values rounded to it) and drop
        the blocks."""
        parts, row = [], 0
        for start in sorted(self._pending):
            part = self._pending[start]
            if start != row:
                raise ValueError(f"rows {row}..{start} of a [{self.out_features}, {self.in_features}] projection "
                                 f"are missing or filled twice")
            qtype = part.qtype if isinstance(part, QuantizedTensor) else None
            if parts and qtype is not None and parts[-1][0] == qtype:
                parts[-1][1].append(part.blocks)
            else:
                parts.append((qtype, [part.blocks if qtype else part.to(self.dtype)]))
            row = start + part.shape[0]
        if row != self.out_features:
            raise ValueError(f"rows {row}..{self.out_features} of a projection are missing")
        self._pending.clear()
        joined = [(q, tensors[0] if len(tensors) == 1 else torch.cat(tensors)) for q, tensors in parts]
        if materialize:
            from braid_kernels.quant_formats import dequantize_torch

            decoded = [w if q is None else dequantize_torch(w, q, self.dtype) for q, w in joined]
            joined = [(None, decoded[0] if len(decoded) == 1 else torch.cat(decoded))]
        for i, (qtype, weight) in enumerate(joined):  # a single part keeps its tensor: a tied lm_head shares it
            self.register_buffer(f"part{i}", weight, persistent=False)
            self.qtypes.append(qtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self._part(i, x) for i in range(len(self.qtypes))]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return y if self.bias is None else y + self.bias

    def _part(self, i: int, x: torch.Tensor) -> torch.Tensor:
        qtype, weight = self.qtypes[i], getattr(self, f"part{i}")
        if qtype is None:
            return F.linear(x, weight)
        if weight.is_cuda:
            from braid_kernels.quant import quant_linear

            return quant_linear(x, weight, qtype)
        from braid_kernels.quant_formats import dequantize_torch

        return F.linear(x, dequantize_torch(weight, qtype, x.dtype))

    def kernel_path(self) -> str:
        kinds = "+".join(q or "float" for q in self.qtypes)
        device = getattr(self, "part0").device.type if self.qtypes else "cpu"
        if device == "cuda":
            return f"quant linear {kinds}: triton quant_linear (GEMV <= 8 rows, else dequantise + matmul)"
        if kinds == "float":
            return "quant linear (decoded at load): torch F.linear"
        return f"quant linear {kinds}: torch dequantize per call + F.linear"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, parts={self.qtypes}"
