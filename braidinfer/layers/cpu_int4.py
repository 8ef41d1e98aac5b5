"""GGUF Q4_0 / Q4_1 weights in the layout of torch's CPU int4 weight-only matmul (`_weight_int4pack_mm_for_cpu`).

Both types store groups of 32 weights as 4-bit codes q in [0, 16) with a float16 scale d (Q4_1 also a float16
minimum m): Q4_0 w = d * (q - 8), Q4_1 w = d * q + m. torch's op computes x @ W.T with W = (q - 8) * scale + zero per
group of 32 along K, so scale = d and zero = 0 (Q4_0) or m + 8 d (Q4_1) represent the same weights: the codes are
carried over unchanged and only the float32 rounding of the affine step can differ (m + 8 d is rounded once).
The matmul reads 4.5 bits per weight instead of the 32 of a dequantised float32 matrix.
"""
from __future__ import annotations

import torch

INT4_TYPES = frozenset({"Q4_0", "Q4_1"})
_GROUP = 32
_INNER_K_TILES = 2  # the op's tiling along K: K must be a multiple of 16 * _INNER_K_TILES


def int4pack_supported(qtype: str, cols: int) -> bool:
    """Whether a [rows, cols] weight of `qtype` can take the int4pack matmul."""
    ops = torch.ops.aten
    return (qtype in INT4_TYPES and cols % (16 * _INNER_K_TILES) == 0
            and hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu"))


def to_int4pack(blocks: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 blocks [N, row_bytes] of Q4_0/Q4_1 -> (packed codes, float32 scales_and_zeros [K / 32, N, 2])."""
    n = blocks.shape[0]
    head = 2 if qtype == "Q4_0" else 4
    b = blocks.reshape(n, -1, head + 16)  # (N, K / 32, block bytes)
    d = b[..., :2].contiguous().view(torch.float16).float().squeeze(-1)
    zero = torch.zeros_like(d) if qtype == "Q4_0" else \
        b[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1) + 8 * d
    qs = b[..., head:]  # low nibbles: weights 0-15 of the block, high nibbles: 16-31
    codes = torch.cat((qs & 0x0F, qs >> 4), dim=-1).reshape(n, -1).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, _INNER_K_TILES)
    return packed, torch.stack((d, zero), dim=-1).transpose(0, 1).contiguous()


def int4pack_linear(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W.T for W held by `to_int4pack`, in x's dtype."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, _GROUP, scales_zeros.to(x.dtype))
