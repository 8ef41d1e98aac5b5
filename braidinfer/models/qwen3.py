"""Qwen3 dense decoder: the Llama block plus a per-head RMSNorm on q and k before RoPE (QK-norm).

Parameter names follow Hugging Face's Qwen3ForCausalLM (q_norm / k_norm inside self_attn).
"""
from __future__ import annotations

from braidinfer.layers import PagedAttention, RMSNorm
from braidinfer.models.config import ModelConfig
from braidinfer.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class Qwen3Attention(LlamaAttention):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)  # over head_dim, each head of q
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.attn = PagedAttention(layer_idx, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                   q_norm=self.q_norm, k_norm=self.k_norm)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3Model(LlamaModel):
    layer_cls = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    model_cls = Qwen3Model
