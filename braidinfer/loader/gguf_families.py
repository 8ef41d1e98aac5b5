"""What differs between llama.cpp's GGUF architectures when mapped back to Hugging Face: one GGUFFamily each.

A family names the HF architecture a `general.architecture` loads as, the GGUF tensor names it adds to (or changes
in) the Llama table of gguf_tensors.py, whether llama.cpp row-permuted its q/k projections, and two optional hooks:
`config(meta, config)` adds the family's own config.json keys from its metadata (`meta(key, default)` reads
"{arch}.{key}"), and `tensor(hf_name, tensor, config)` turns a dequantised tensor back into the HF layout.
A new family is one entry in FAMILIES, with its hooks in a module of its own when they are more than a line.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

MetadataReader = Callable[[str, Any], Any]


@dataclass(frozen=True)
class GGUFFamily:
    """How one GGUF architecture maps onto a Hugging Face one."""

    architecture: str
    """HF `architectures[0]` the file loads as (a config hook may still change it, e.g. llama -> Mistral)."""
    model_type: str
    """HF `model_type`."""
    layer_names: Mapping[str, str] = field(default_factory=dict)
    """GGUF per-layer tensor stem -> HF submodule path, over (and replacing) the Llama table."""
    global_names: Mapping[str, str] = field(default_factory=dict)
    """GGUF global tensor stem -> HF module path, over the Llama table."""
    permuted_qk: bool = False
    """llama.cpp's converter row-permuted attn_q / attn_k (its llama architecture): undo it at load."""
    config: Callable[[MetadataReader, dict[str, Any]], None] | None = None
    """Adds or changes config.json keys from the family's metadata, in place."""
    tensor: Callable[[str, torch.Tensor, dict[str, Any]], torch.Tensor] | None = None
    """(HF name, float32 tensor, config) -> the tensor in HF layout (e.g. undoing a stored offset)."""


FAMILIES: Mapping[str, GGUFFamily] = MappingProxyType({
    "llama": GGUFFamily("LlamaForCausalLM", "llama", permuted_qk=True),
    "qwen3": GGUFFamily("Qwen3ForCausalLM", "qwen3"),
})
