"""GGUF tensor names and layouts mapped back to Hugging Face parameters: the Llama table, which each family's
GGUFFamily (gguf_families.py) extends."""
from __future__ import annotations

import re

import torch

from braidinfer.loader.gguf_families import GGUFFamily

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Tensors that hold no parameter: llama.cpp's Llama 3 rope divisors and Phi-3's LongRoPE factor sets become
# hf_config["rope_scaling"] instead.
NON_PARAMETERS = frozenset({"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"})
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_TENSOR = re.compile(r"(\w+)\.(weight|bias)")


def hf_name(gguf_name: str, family: GGUFFamily | None = None) -> str | None:
    """The HF parameter name of a GGUF tensor ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight"),
    by the family's names over the Llama table; None for a tensor neither knows."""
    if m := _LAYER_TENSOR.fullmatch(gguf_name):
        part = family.layer_names.get(m[2]) if family is not None else None
        part = part or _LAYER_NAMES.get(m[2])
        return f"model.layers.{m[1]}.{part}.{m[3]}" if part else None
    if m := _GLOBAL_TENSOR.fullmatch(gguf_name):
        part = family.global_names.get(m[1]) if family is not None else None
        part = part or _GLOBAL_NAMES.get(m[1])
        return f"{part}.{m[2]}" if part else None
    return None


def unpermute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undoes the Q/K row permutation llama.cpp's converter applies to llama-architecture q_proj / k_proj.

    llama.cpp rotates interleaved pairs; HF rotates the two halves of each head, so its converter reorders each
    head's rows from (half, dim) to (dim, half). Same arithmetic as transformers' `_reverse_permute_weights`:
    view rows as (n_head, dim, 2) and swap the last two axes.
    """
    dim = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, dim, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def permuted_projection(gguf_name: str) -> str | None:
    """Which of q / k a tensor is, for the ones llama.cpp stores row-permuted in llama GGUFs; None for others."""
    if m := _LAYER_TENSOR.fullmatch(gguf_name):
        return {"attn_q": "q", "attn_k": "k"}.get(m[2])
    return None
