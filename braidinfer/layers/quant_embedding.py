"""A token embedding whose table stays as GGUF blocks: replaces nn.Embedding when the checkpoint holds it quantised."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from braidinfer.loader.quantized import QuantizedTensor


class QuantEmbedding(nn.Module):
    """ids [T] -> rows [T, embedding_dim] of a table held as GGUF blocks in the planes layout
    (braid_kernels/quant_planes.py; only the rows looked up are dequantised), or as a float table when the loader
    had to dequantise it. CUDA: braid_kernels.quant.quant_embedding; CPU: the blocks of the rows, decoded by the
    PyTorch decoder (never Triton). Tied to an lm_head held in the CPU's "dot" form, it reads the rows from that
    lm_head's packed codes instead (`share_packed`: one copy of the table, the same values)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, dtype
        self.qtype: str | None = None
        self.register_buffer("weight", None, persistent=False)  # blocks, or the float table when qtype is None
        self.packed = None  # a braid_kernels.cpu_quant.PackedWeight read instead of `weight` (share_packed)

    def share_packed(self, packed) -> None:
        """Looks rows up in `packed` (the tied lm_head's braid_kernels.cpu_quant.PackedWeight of this table, which
        decodes to the same values as the GGUF blocks) and drops the blocks."""
        if packed.shape != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"a packed table of shape {packed.shape} does not fit "
                             f"[{self.num_embeddings}, {self.embedding_dim}]")
        self.packed, self.weight = packed, None
        for field in ("codes", "scales", "offsets"):  # counted once with the lm_head's (weight_report)
            self.register_buffer(f"packed_{field}", getattr(packed, field), persistent=False)

    def set_weight(self, weight: torch.Tensor | QuantizedTensor) -> None:
        """Takes the table at load: a float tensor (cast), or blocks kept in planes (ValueError on a shape mismatch)."""
        if tuple(weight.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"an embedding of shape {tuple(weight.shape)} does not fit "
                             f"[{self.num_embeddings}, {self.embedding_dim}]")
        self.qtype = weight.qtype if isinstance(weight, QuantizedTensor) else None
        self.weight = weight.in_planes().blocks if self.qtype else weight.to(self.dtype)

    def quantized(self) -> QuantizedTensor | None:
        """The table as a QuantizedTensor (for an lm_head tied to it), or None when it is float."""
        if self.qtype is None:
            return None
        return QuantizedTensor(self.weight, self.qtype, (self.num_embeddings, self.embedding_dim), "planes")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            from braid_kernels.cpu_quant import dequantize_rows

            return dequantize_rows(self.packed, ids).to(self.dtype)
        if self.qtype is None:
            return F.embedding(ids, self.weight)
        if self.weight.is_cuda:
            from braid_kernels.quant import quant_embedding

            return quant_embedding(ids, self.weight, self.qtype, self.dtype)
        from braid_kernels.quant_formats import dequantize_torch
        from braid_kernels.quant_planes import from_planes

        return dequantize_torch(from_planes(self.weight[ids], self.qtype), self.qtype, self.dtype)

    def kernel_path(self) -> str:
        if self.packed is not None:
            return f"quant embedding {self.qtype}: the tied lm_head's packed codes, torch dequantize"
        where = "triton quant_embedding" if self.weight is not None and self.weight.is_cuda else "torch dequantize"
        return f"quant embedding {self.qtype or 'float'}: {where if self.qtype else 'F.embedding'}"
