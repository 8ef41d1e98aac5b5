"""Attention backends: each reads and writes the paged KV cache through per-sequence page tables."""
from braidinfer.attention.metadata import AttentionMetadata, SeqSpan
from braidinfer.attention.torch_backend import TorchAttention

__all__ = ["AttentionMetadata", "SeqSpan", "TorchAttention"]
