"""Finds a model on local disk (embedded GGUF, .gguf file, Hugging Face directory or cached hub id) and streams
its weights as Hugging Face-named tensors.

    from braidinfer.loader import resolve_model
    source = resolve_model("Qwen/Qwen3-0.6B")
    for name, tensor in source.iter_weights(torch.bfloat16): ...
"""
from __future__ import annotations

from braidinfer.loader.embedded import default_model_path
from braidinfer.loader.resolve import resolve_model
from braidinfer.loader.source import ModelSource

__all__ = ["ModelSource", "default_model_path", "resolve_model"]
