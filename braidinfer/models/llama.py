"""Llama-family decoder (Llama 2/3.x, TinyLlama, SmolLM2): pre-norm blocks, GQA, RoPE, SwiGLU MLP.

Parameter names follow Hugging Face's LlamaForCausalLM so checkpoints load by name, except that q/k/v and
gate/up projections are fused into one matrix each (one matmul instead of three or two); `packed_slot` tells the
loader where each checkpoint tensor goes inside them. Which kernel each layer runs is the layers' business
(braidinfer.layers.select_kernels).
"""
from __future__ import annotations

import torch
from torch import nn

from braidinfer.attention.spec import AttentionSpec, uniform_specs
from braidinfer.layers import Linear, PagedAttention, RMSNorm, RotaryEmbedding, SiluAndMul
from braidinfer.models.config import ModelConfig
from braidinfer.models.forward_batch import ForwardBatch


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        q_size, kv_size = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(q_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.attn = PagedAttention(layer_idx, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # (T, (qh + 2 * kvh) * hd)
        o = self.attn(qkv, batch)  # (T, qh * hd): RoPE on q and k, k and v into the pool, attention
        return self.o_proj(o)  # (T, hidden)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # (T, 2 * intermediate): gate then up
        return self.down_proj(self.act_fn(gate_up))  # silu(gate) * up: (T, intermediate) -> (T, hidden)


class LlamaDecoderLayer(nn.Module):
    attention_cls = LlamaAttention

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = self.attention_cls(cfg, layer_idx)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous block's MLP output (the embeddings for the first layer, residual None); residual: the
        stream before it. Returns (this block's MLP output, the residual stream before it); the adds happen inside
        the next norm (h = x + residual, then RMSNorm(h)), so one kernel can do both."""
        if residual is None:
            normed, residual = self.input_layernorm(x), x
        else:
            normed, residual = self.input_layernorm(x, residual)
        normed, residual = self.post_attention_layernorm(self.self_attn(normed, batch), residual)
        return self.mlp(normed), residual


class LlamaModel(nn.Module):
    layer_cls = LlamaDecoderLayer

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self.layer_cls(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """input_ids: [T] -> final hidden states [T, hidden]."""
        h = self.embed_tokens(input_ids)  # (T, hidden)
        batch.rope = self.rotary_emb.at(batch.positions)  # the step's rotation, shared by every layer
        residual = None
        for layer in self.layers:
            h, residual = layer(h, residual, batch)
        return self.norm(h, residual)[0]


class LlamaForCausalLM(nn.Module):
    model_cls = LlamaModel

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = self.model_cls(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.model(input_ids, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, vocab] in the model's dtype. Not cast to float32 here: greedy rows take
        their argmax as they are, and the engine and sampler convert the rows that need float32 arithmetic."""
        return self.lm_head(hidden)

    def packed_slot(self, name: str) -> tuple[str, int, int] | None:
        """For a checkpoint tensor of a fused projection: (parameter name, first row, number of rows); else None."""
        c = self.config
        q, kv, inter = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size
        slots = {"q_proj": ("qkv_proj", 0, q), "k_proj": ("qkv_proj", q, kv), "v_proj": ("qkv_proj", q + kv, kv),
                 "gate_proj": ("gate_up_proj", 0, inter), "up_proj": ("gate_up_proj", inter, inter)}
        parts = name.split(".")
        if len(parts) < 2 or parts[-2] not in slots:
            return None
        packed, start, rows = slots[parts[-2]]
        return ".".join(parts[:-2] + [packed, parts[-1]]), start, rows

    def shift_keys(self, k: torch.Tensor, delta: int) -> torch.Tensor:
        """Rotary-embedded keys [..., layers, kv_heads, head_dim] moved `delta` positions later (composed prompts)."""
        return self.model.rotary_emb.shift_keys(k, delta)

    def attention_specs(self) -> list[AttentionSpec]:
        """One AttentionSpec per layer, for the attention backend: plain causal attention scaled by head_dim ** -0.5."""
        return uniform_specs(self.config.num_hidden_layers, self.config.head_dim)
