"""Mistral in GGUF: llama.cpp exports Mistral 7B as its `llama` architecture, so the sliding window is what tells
the two apart. A llama file with `llama.attention.sliding_window` loads as a windowed MistralForCausalLM."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # gguf_families imports this module for its llama entry
    from braidinfer.loader.gguf_families import MetadataReader


def mistral_if_windowed(meta: MetadataReader, config: dict[str, Any]) -> None:
    """The llama family's config hook: a sliding window makes the model Mistral (in place)."""
    window = meta("attention.sliding_window", None)
    if window is not None:
        config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=int(window))
