"""ERNIE-4.5 dense decoder (0.3B): the Llama block with RoPE on interleaved pairs, rotated in float32, and one
`use_bias` switch for every projection.

Parameter names follow Hugging Face's Ernie4_5ForCausalLM. Its rotary embedding turns dims (2i, 2i + 1) of each
head by frequency i (GLM style), where the shared rotation turns dims (i, i + head_dim / 2). q.k is unchanged when
q and k reorder their dims alike, so `load_hook` moves each head's q/k rows (and biases) from pairs to halves once,
and the shared half-split rotation then computes ERNIE's. transformers rotates in float32 and rounds once after
(`apply_rotary_pos_emb` upcasts q and k), hence rotate_in_float32.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from braidinfer.layers import Linear, PagedAttention
from braidinfer.loader.quantized import QuantizedTensor
from braidinfer.models.config import ModelConfig
from braidinfer.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel


def _use_bias(cfg: ModelConfig) -> bool:
    return bool(cfg.hf_config.get("use_bias", False))


class Ernie4_5Attention(LlamaAttention):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        q_size, kv_size = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=_use_bias(cfg))
        self.o_proj = Linear(q_size, cfg.hidden_size, bias=_use_bias(cfg))
        self.attn = PagedAttention(layer_idx, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                   rotate_in_float32=True)


class Ernie4_5MLP(LlamaMLP):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=_use_bias(cfg))
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=_use_bias(cfg))


class Ernie4_5DecoderLayer(LlamaDecoderLayer):
    attention_cls = Ernie4_5Attention

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.mlp = Ernie4_5MLP(cfg)


class Ernie4_5Model(LlamaModel):
    layer_cls = Ernie4_5DecoderLayer


class Ernie4_5ForCausalLM(LlamaForCausalLM):
    model_cls = Ernie4_5Model

    def load_hook(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
        """q_proj / k_proj weights and biases with each head's rows reordered from interleaved pairs to halves."""
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in ("q_proj", "k_proj"):
            if isinstance(tensor, QuantizedTensor):  # GGUF blocks: rows are independent, so reorder whole rows
                return name, replace(tensor, blocks=pairs_to_halves(tensor.blocks, self.config.head_dim))
            tensor = pairs_to_halves(tensor, self.config.head_dim)
        return name, tensor


def pairs_to_halves(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """rows [heads * head_dim, ...]: in each head, rows (0, 1, 2, 3, ...) -> (0, 2, 4, ..., 1, 3, 5, ...), so that
    the pair (2i, 2i + 1) lands on (i, i + head_dim / 2)."""
    heads = rows.shape[0] // head_dim
    by_pair = rows.reshape(heads, head_dim // 2, 2, *rows.shape[1:])  # (heads, hd / 2, 2, ...)
    return by_pair.transpose(1, 2).reshape(rows.shape)  # (heads, 2, hd / 2, ...): first elements, then seconds
