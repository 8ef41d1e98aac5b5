"""A checkpoint tensor kept as GGML blocks (GGUF's quantised storage), for layers that compute from the blocks."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# The block types braid_kernels.quant computes from; kept here as names so that the loader does not import the
# kernels package (importing it decorates Triton functions). tests/unit/test_quant_loader.py checks they agree.
QUANTIZED_TYPES = frozenset({"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"})


LAYOUTS = ("gguf", "planes")


@dataclass(frozen=True)
class QuantizedTensor:
    """A 2-D weight [rows, cols] held as its GGUF blocks: uint8 [rows, row_bytes], each row encoding one weight row.

    Rows are independent, so selecting or reordering whole rows of blocks (q/k un-permutation, splitting a fused
    projection) is exact. layout: "gguf", the blocks as the file stores them; "planes", the same bytes regrouped field
    by field within each row (braid_kernels/quant_planes.py), the layout the GPU kernels read.
    """

    blocks: torch.Tensor
    qtype: str
    shape: tuple[int, int]
    layout: str = "gguf"

    def __post_init__(self):
        if self.qtype not in QUANTIZED_TYPES:
            raise ValueError(f"qtype must be one of {sorted(QUANTIZED_TYPES)}, got {self.qtype!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.blocks.dtype != torch.uint8 or self.blocks.ndim != 2 or self.blocks.shape[0] != self.shape[0]:
            raise ValueError(f"blocks must be uint8 [{self.shape[0]}, row_bytes], got {self.blocks.dtype} "
                             f"{tuple(self.blocks.shape)}")

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks (the whole tensor's storage)."""
        return self.blocks.numel()

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """The same tensor with its blocks on `device` (contiguous, as the kernels need)."""
        return QuantizedTensor(self.blocks.to(device).contiguous(), self.qtype, self.shape, self.layout)

    def in_planes(self) -> QuantizedTensor:
        """This tensor in the planes layout (itself if it already is; else a new tensor of the same bytes)."""
        if self.layout == "planes":
            return self
        from braid_kernels.quant_planes import to_planes

        return QuantizedTensor(to_planes(self.blocks, self.qtype), self.qtype, self.shape, "planes")

    def gguf_blocks(self) -> torch.Tensor:
        """The blocks in GGUF's layout (self.blocks, or a new tensor regrouped from the planes)."""
        if self.layout == "gguf":
            return self.blocks
        from braid_kernels.quant_planes import from_planes

        return from_planes(self.blocks, self.qtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weights [rows, cols] in `dtype`, by the PyTorch decoder (gguf's values, bit for bit, in float32)."""
        from braid_kernels.quant_formats import dequantize_torch

        return dequantize_torch(self.gguf_blocks(), self.qtype, dtype)
