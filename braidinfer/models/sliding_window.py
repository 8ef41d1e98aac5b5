"""Which layers of a model attend through a sliding window, from its config: the per-layer AttentionSpecs of the
families that window some or all of their layers (Mistral, Ministral, Qwen2).

transformers 5 writes the choice per layer as `layer_types` ("sliding_attention" / "full_attention"); older
config.json files leave it to a family rule (Mistral: every layer; Qwen2: layers >= max_window_layers), which the
caller passes as `default_windowed`.
"""
from __future__ import annotations

from collections.abc import Callable

from braidinfer.attention.spec import AttentionSpec, uniform_specs
from braidinfer.errors import InvalidModelError
from braidinfer.models.config import ModelConfig


def sliding_window_specs(cfg: ModelConfig, window: int | None,
                         default_windowed: Callable[[int], bool]) -> list[AttentionSpec]:
    """One spec per layer scaled by head_dim ** -0.5; the windowed layers see the last `window` tokens (None: no
    layer is windowed). `layer_types` in the config, when present, decides which layers are windowed; else
    `default_windowed(layer_idx)`."""
    num_layers = cfg.num_hidden_layers
    if window is None:
        return uniform_specs(num_layers, cfg.head_dim)
    if not isinstance(window, int) or window < 1:
        raise InvalidModelError(f"sliding_window must be a positive integer or null, got {window!r}")
    layer_types = cfg.hf_config.get("layer_types")
    if layer_types is None:
        windowed = [default_windowed(i) for i in range(num_layers)]
    elif len(layer_types) != num_layers:
        raise InvalidModelError(f"layer_types names {len(layer_types)} layers, the model has {num_layers}")
    else:
        windowed = [kind == "sliding_attention" for kind in layer_types]
    scale = cfg.head_dim**-0.5
    return [AttentionSpec(scale=scale, sliding_window=window if w else None) for w in windowed]
