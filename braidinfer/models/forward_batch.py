"""What one forward pass needs besides the token ids: positions, the step's rotation and the attention call."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from braidinfer.attention.metadata import AttentionMetadata
from braidinfer.layers.rotary import Rotation


class AttentionFn(Protocol):
    kv_cache: torch.Tensor  # [layers, pages, 2, kv_heads, page_size, head_dim]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        """Writes the new k, v into the pool at meta.slot_mapping, then attends (see `attend`)."""

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention of q [T, qo_heads, head_dim] over the step's KV, the new tokens' already in the pool."""


@dataclass
class ForwardBatch:
    """Built once per step by the runner and passed down through every layer (no global state)."""

    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    attention: AttentionFn
    rope: Rotation | None = None  # the step's rotary tables, set by the model from positions
    # positions and meta.slot_mapping were copied from the host before the step (a CUDA-graph replay) and no kernel
    # writes them: a kernel may read them before waiting for the kernel ahead (programmatic dependent launch)
    host_inputs: bool = False
