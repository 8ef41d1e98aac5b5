"""Phi-3's GGUF (llama.cpp architecture "phi3") back to its Hugging Face config.

llama.cpp's converter keeps the fused qkv and gate_up projections as they are (attn_qkv, ffn_up), stores LongRoPE's
two factor sets as the tensors rope_factors_long / rope_factors_short (float32, rotary_dim / 2 each) with the
pre-training context as rope.scaling.original_context_length, the rotary dims as rope.dimension_count (Phi-4-mini's
partial rotary) and the window as attention.sliding_window.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # gguf_families imports this module for its FAMILIES table
    from braidinfer.loader.gguf_families import MetadataReader

FACTOR_TENSORS = {"long_factor": "rope_factors_long.weight", "short_factor": "rope_factors_short.weight"}


def phi3_config(meta: MetadataReader, config: dict[str, Any]) -> None:
    """Adds partial_rotary_factor, sliding_window and original_max_position_embeddings from the metadata."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rotary_dim = meta("rope.dimension_count")
    if rotary_dim is not None and int(rotary_dim) != head_dim:
        config["partial_rotary_factor"] = int(rotary_dim) / head_dim
    window = meta("attention.sliding_window")
    if window:
        config["sliding_window"] = int(window)
    original = meta("rope.scaling.original_context_length")
    if original is not None:
        config["original_max_position_embeddings"] = int(original)


def longrope_scaling(factors: dict[str, np.ndarray], meta: MetadataReader, config: dict[str, Any]) -> dict[str, Any]:
    """The HF rope_scaling dict of LongRoPE from the two factor tensors (name -> dequantised values).

    The attention factor llama.cpp stores (rope.scaling.attn_factor) is the one transformers derives from the
    context lengths, rounded to float32; it is kept only when it says something else."""
    original = int(meta("rope.scaling.original_context_length", config["max_position_embeddings"]))
    scaling: dict[str, Any] = {"rope_type": "longrope", "original_max_position_embeddings": original}
    scaling.update({key: [float(x) for x in np.asarray(values).reshape(-1)] for key, values in factors.items()})
    stored = meta("rope.scaling.attn_factor")
    scale = config["max_position_embeddings"] / original
    derived = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
    if stored is not None and not math.isclose(float(stored), derived, rel_tol=1e-6):
        scaling["attention_factor"] = float(stored)
    return scaling
