"""The per-step description of a batch that every attention backend reads; built once per step by the runner."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SeqSpan:
    """One sequence's part of a flattened batch.

    Its new tokens are rows [q_start, q_start + q_len) of the batch; after this step its KV covers `context_len`
    tokens (the cached/computed ones plus the q_len new ones), stored in the pages of `page_table` in order.
    """

    q_start: int
    q_len: int
    context_len: int
    page_table: torch.Tensor  # [num_pages] int64, on the KV cache's device


@dataclass(frozen=True)
class AttentionMetadata:
    """Where the step's new keys and values go and which cached tokens each query attends to."""

    spans: list[SeqSpan]
    slot_mapping: torch.Tensor  # [T] int64: page * page_size + offset of each new token's KV slot
    num_tokens: int

    @property
    def is_decode_only(self) -> bool:
        return all(s.q_len == 1 for s in self.spans)
