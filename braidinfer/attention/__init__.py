"""Attention backends: each reads and writes the paged KV cache through per-sequence page tables.

Imports are lazy, so that the torch-free modules here (`metadata`, `cascade_plan`) load without torch."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "AttentionMetadata": "braidinfer.attention.metadata",
    "SeqSpan": "braidinfer.attention.metadata",
    "TorchAttention": "braidinfer.attention.torch_backend",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from braidinfer.attention.metadata import AttentionMetadata, SeqSpan
    from braidinfer.attention.torch_backend import TorchAttention


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'braidinfer.attention' has no attribute {name!r}")
