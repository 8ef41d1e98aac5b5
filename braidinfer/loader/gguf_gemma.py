"""Gemma 2 and Gemma 3 GGUFs (llama.cpp's `gemma2` and `gemma3` architectures, text part) mapped back to Hugging Face.

llama.cpp's converter stores every Gemma norm weight plus one (its norm multiplies by w, Hugging Face's by 1 + w;
convert_hf_to_gguf.py Gemma2Model / Gemma3Model.modify_tensors), so the tensor hook subtracts it again, as
transformers' Gemma2TensorProcessor does. query_pre_attn_scalar is not in the metadata: llama.cpp scales by
head_dim ** -0.5, except for the 27B models (hidden / heads; llama-model.cpp f_attention_scale), which it recognises
by their layer count; the same rule is applied here. Gemma 3's local layers rotate with base 10000 and every sixth
layer is global in llama.cpp unless the file states a pattern.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # gguf_families imports this module for its FAMILIES table
    from braidinfer.loader.gguf_families import MetadataReader

LAYER_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Layer counts of the 27B models, whose attention llama.cpp scales by hidden / heads instead of head_dim.
_LAYERS_OF_27B = {"gemma2": 46, "gemma3": 62}


def norm_weight(name: str, tensor: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """Undoes the converter's +1 on norm weights (input, post-attention, pre/post-feedforward, final, q/k norms)."""
    return tensor - 1 if name.endswith("norm.weight") else tensor


def gemma2_config(meta: MetadataReader, config: dict[str, Any]) -> None:
    """Soft-caps, sliding window and attention scale of a gemma2 GGUF as Gemma2Config keys."""
    config["attn_logit_softcapping"] = _float_or_none(meta("attn_logit_softcapping", None))
    config["final_logit_softcapping"] = _float_or_none(meta("final_logit_softcapping", None))
    config["sliding_window"] = meta("attention.sliding_window", None)
    config["query_pre_attn_scalar"] = _query_pre_attn_scalar("gemma2", config)
    config["hidden_activation"] = "gelu_pytorch_tanh"


def gemma3_config(meta: MetadataReader, config: dict[str, Any]) -> None:
    """Sliding window and its pattern, local rope base and attention scale of a gemma3 GGUF as Gemma3TextConfig keys."""
    config["sliding_window"] = meta("attention.sliding_window", None)
    pattern = meta("attention.sliding_window_pattern", None)
    if isinstance(pattern, list):  # per layer, True where the layer slides
        config["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
        config["sliding_window_pattern"] = int(pattern or 6)
    config["rope_local_base_freq"] = 10000.0
    config["query_pre_attn_scalar"] = _query_pre_attn_scalar("gemma3", config)
    config["hidden_activation"] = "gelu_pytorch_tanh"


def _query_pre_attn_scalar(arch: str, config: dict[str, Any]) -> int:
    if config["num_hidden_layers"] == _LAYERS_OF_27B[arch]:
        return config["hidden_size"] // config["num_attention_heads"]
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)
