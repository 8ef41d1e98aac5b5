"""What one forward pass needs besides the token ids: positions, rotary tables and the attention call."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from braidinfer.attention.metadata import AttentionMetadata


class AttentionFn(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor: ...


@dataclass
class ForwardBatch:
    """Built once per step by the runner and passed down through every layer (no global state)."""

    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    attention: AttentionFn
    cos: torch.Tensor | None = None  # [T, 1, head_dim], filled by the model from positions
    sin: torch.Tensor | None = None
