"""LongRoPE ("su") scaling of Phi-3 / Phi-3.5 / Phi-4-mini: a rescale per rotary frequency and a scale of cos/sin.

A checkpoint carries two rescale sets, `short_factor` for contexts up to `original_max_position_embeddings` (the
pre-training length) and `long_factor` beyond; frequency i becomes 1 / (factor_i * theta ** (2i / rotary_dim)).
cos and sin are multiplied by an attention factor, sqrt(1 + ln(s) / ln(original)) with
s = max_position_embeddings / original (1 when s <= 1), unless the config states `attention_factor`.

transformers picks the set at every forward from the longest position it sees, so one sequence switches sets when it
grows past the original length (and its cached keys keep the old rotation). The engine picks once, from the context it
serves: the long set when max_model_len exceeds the original length, else the short one. Served with a max_model_len
<= original the engine equals transformers exactly; served longer, it equals transformers on every sequence longer
than the original length and differs (by design, consistently) on shorter ones.
Same arithmetic as transformers' `_compute_longrope_parameters`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from braidinfer.errors import InvalidModelError
from braidinfer.layers.rotary import RotaryEmbedding

LONGROPE_TYPES = ("longrope", "su")
"""rope_scaling types that mean LongRoPE (Phi-3's early configs say "su")."""


def is_longrope(scaling: Mapping[str, Any] | None) -> bool:
    """Whether a config's rope_scaling dict asks for LongRoPE."""
    return scaling is not None and scaling.get("rope_type", scaling.get("type")) in LONGROPE_TYPES


def original_max_positions(scaling: Mapping[str, Any], hf_config: Mapping[str, Any]) -> int:
    """The pre-training context: top level in Phi-3's config.json, inside rope_parameters in transformers >= 5."""
    value = hf_config.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
    if value is None:
        raise InvalidModelError("longrope rope scaling needs original_max_position_embeddings in the model config")
    return int(value)


def longrope_parameters(rotary_dim: int, theta: float, scaling: Mapping[str, Any], original: int,
                        max_position_embeddings: int, long: bool) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rotary_dim // 2] float32, attention factor) for the long or the short factor set."""
    factors = scaling["long_factor" if long else "short_factor"]
    if len(factors) != rotary_dim // 2:
        raise InvalidModelError(f"longrope {'long' if long else 'short'}_factor has {len(factors)} entries, "
                                f"expected rotary_dim / 2 = {rotary_dim // 2}")
    factor = scaling.get("factor") or max_position_embeddings / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    # On the CPU explicitly: models are built under torch.device("meta"), the tables are not parameters.
    ext = torch.tensor(factors, dtype=torch.float32, device="cpu")
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim
    return 1.0 / (ext * theta**exponents), float(attention_factor)


class LongRoPEEmbedding(RotaryEmbedding):
    """A RotaryEmbedding over `rotary_dim` with LongRoPE frequencies and cos/sin scaled by the attention factor.

    use_long: which factor set (see the module docstring: the engine decides from the served max_model_len).
    """

    def __init__(self, rotary_dim: int, theta: float, scaling: Mapping[str, Any], original: int,
                 max_positions: int, use_long: bool):
        super().__init__(rotary_dim, theta, None, max_positions)
        self.use_long = use_long
        self.inv_freq, self.attention_factor = longrope_parameters(rotary_dim, theta, scaling, original,
                                                                   max_positions, use_long)
