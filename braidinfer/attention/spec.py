"""What one layer's attention computes besides q, k and v: the softmax scale, a sliding window, logit soft-capping.

Every model supplies one AttentionSpec per layer (`attention_specs()`); the backends honour them: the torch backend
in its masks and scores, FlashInfer through `sm_scale`, `window_left` and `logits_soft_cap` (one planned wrapper per
distinct spec). Plain Python: tested without torch.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionSpec:
    """One layer's attention numerics.

    scale: the softmax scale applied to q.k (head_dim ** -0.5 unless the family says otherwise, e.g. Gemma's
        query_pre_attn_scalar ** -0.5).
    sliding_window: None (every earlier token) or W >= 1: the query at position p sees the keys at positions
        p - W + 1 .. p (transformers' `kv_idx > q_idx - sliding_window`; FlashInfer's window_left = W - 1).
    logits_soft_cap: None or c > 0: scores become c * tanh(scores / c) before the mask and the softmax (Gemma 2).
    """

    scale: float
    sliding_window: int | None = None
    logits_soft_cap: float | None = None

    def __post_init__(self):
        if not self.scale > 0:
            raise ValueError(f"AttentionSpec.scale must be > 0, got {self.scale}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"AttentionSpec.sliding_window must be None or >= 1, got {self.sliding_window}")
        if self.logits_soft_cap is not None and not self.logits_soft_cap > 0:
            raise ValueError(f"AttentionSpec.logits_soft_cap must be None or > 0, got {self.logits_soft_cap}")

    @property
    def window_left(self) -> int:
        """FlashInfer's window_left: how many tokens before its own a query sees (-1: all of them)."""
        return -1 if self.sliding_window is None else self.sliding_window - 1

    @property
    def is_plain(self) -> bool:
        """Causal softmax attention with only a scale: what every kernel path (Triton decode, cascade) computes."""
        return self.sliding_window is None and self.logits_soft_cap is None


def uniform_specs(num_layers: int, head_dim: int) -> list[AttentionSpec]:
    """The specs of a model whose every layer is plain attention scaled by head_dim ** -0.5 (Llama, Qwen)."""
    return [AttentionSpec(scale=head_dim**-0.5)] * num_layers


def distinct_specs(specs: Sequence[AttentionSpec]) -> list[AttentionSpec]:
    """The different specs among a model's layers, in order of first appearance (one planned wrapper each)."""
    return list(dict.fromkeys(specs))


def non_plain_reason(specs: Sequence[AttentionSpec]) -> str | None:
    """Why a path that computes only plain attention (Triton decode, cascade) cannot serve these layers, or None."""
    windows = sorted({s.sliding_window for s in specs if s.sliding_window is not None})
    caps = sorted({s.logits_soft_cap for s in specs if s.logits_soft_cap is not None})
    parts = ([f"sliding windows {windows}"] if windows else []) + ([f"logit soft-capping {caps}"] if caps else [])
    return f"the model's attention has {' and '.join(parts)}" if parts else None


def per_layer_specs(specs: Sequence[AttentionSpec] | float, num_layers: int) -> list[AttentionSpec]:
    """A backend's `specs` argument as one spec per layer: the specs themselves (one per layer), or a bare scale for
    plain attention in every layer."""
    if isinstance(specs, (int, float)):
        return [AttentionSpec(scale=float(specs))] * num_layers
    if len(specs) != num_layers:
        raise ValueError(f"{len(specs)} attention specs for a KV cache of {num_layers} layers")
    return list(specs)
