"""Qwen3 dense decoder: the Llama block plus a per-head RMSNorm on q and k before RoPE (QK-norm).

Parameter names follow Hugging Face's Qwen3ForCausalLM (q_norm / k_norm inside self_attn).
"""
from __future__ import annotations

import torch

from braidinfer.models.config import ModelConfig
from braidinfer.models.layers import RMSNorm
from braidinfer.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class Qwen3Attention(LlamaAttention):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def qk_norm(self, q: torch.Tensor, k: torch.Tensor):
        return self.q_norm(q), self.k_norm(k)  # (T, heads, hd): normalised over head_dim

    def qk_norm_weights(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.q_norm.weight, self.k_norm.weight, self.q_norm.eps


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3Model(LlamaModel):
    layer_cls = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    model_cls = Qwen3Model
