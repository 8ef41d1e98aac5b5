"""Llama-family decoder (Llama 2/3.x, TinyLlama, SmolLM2): pre-norm blocks, GQA, RoPE, SwiGLU MLP.

Parameter names follow Hugging Face's LlamaForCausalLM so checkpoints load by name, except that q/k/v and
gate/up projections are fused into one matrix each (one matmul instead of three or two); `packed_slot` tells the
loader where each checkpoint tensor goes inside them.
"""
from __future__ import annotations

import torch
from torch import nn

from braidinfer.models.config import ModelConfig
from braidinfer.models.forward_batch import ForwardBatch
from braidinfer.models.layers import RMSNorm, RotaryEmbedding, apply_rotary

# Steps of at most this many rows take the GEMV kernels when they are enabled: one. At two rows a Qwen3-0.6B
# layer's four GEMVs take as long as cuBLAS and the elementwise kernels (31.4 us both on an H100), at 4-8 rows
# 2-4x longer (benchmarks/gemv.py, benchmarks/RESULTS.md); the kernels themselves take up to kernels.gemv.MAX_ROWS.
GEMV_MAX_ROWS = 1


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = cfg.attention_bias
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=bias)

        self.fused = False  # the Triton QK-norm + RoPE + KV-write kernel (CUDA only), same rounding

    def qk_norm(self, q: torch.Tensor, k: torch.Tensor):
        """Hook for architectures that normalise q and k per head before RoPE (Qwen3); identity here."""
        return q, k

    def qk_norm_weights(self) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        """(q weight, k weight, eps) of the per-head QK-norm for the fused kernel; no norm here."""
        return None, None, 1e-6

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)  # (T, q_size + 2 * kv_size)
        if self.fused:
            return self.o_proj(self.attend_fused(qkv, batch))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)  # (T, qh, hd)
        k = k.view(T, self.num_kv_heads, self.head_dim)  # (T, kvh, hd)
        v = v.view(T, self.num_kv_heads, self.head_dim)  # (T, kvh, hd)
        q, k = self.qk_norm(q, k)
        q, k = apply_rotary(q, batch.cos, batch.sin), apply_rotary(k, batch.cos, batch.sin)
        o = batch.attention(self.layer_idx, q, k, v, batch.meta)  # (T, qh, hd)
        return self.o_proj(o.reshape(T, self.num_heads * self.head_dim))

    def attend_fused(self, qkv: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """qkv [T, q_size + 2 * kv_size] -> attention output [T, q_size], before o_proj. One kernel does QK-norm,
        RoPE and the write of the new K/V into the pool; the backend then only attends."""
        import kernels

        q = kernels.qk_norm_rope_write_kv(qkv, batch.positions, *batch.rope_tables,
                                          batch.attention.kv_cache[self.layer_idx], batch.meta.slot_mapping,
                                          *self.qk_norm_weights())  # (T, qh, hd)
        o = batch.attention.attend(self.layer_idx, q, batch.meta)  # (T, qh, hd)
        return o.reshape(qkv.shape[0], self.q_size)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.fused = False  # the Triton SiLU-and-mul kernel (CUDA only), same rounding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # (T, 2 * intermediate): gate then up
        if self.fused:
            import kernels

            return self.down_proj(kernels.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    attention_cls = LlamaAttention

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = self.attention_cls(cfg, layer_idx)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gemv = False  # steps of a few rows through `forward_gemv` (CUDA only), same rounding

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous block's MLP output (the embeddings for the first layer, residual None); residual: the
        stream before it. Returns (this block's MLP output, the residual stream before it); the adds happen inside
        the next norm, so a fused add+RMSNorm kernel can do both."""
        if self.gemv and x.shape[0] <= GEMV_MAX_ROWS:
            return self.forward_gemv(x, residual, batch)
        if residual is None:
            residual, normed = x, self.input_layernorm(x)
        else:
            normed, residual = self.input_layernorm(x, residual)
        normed, residual = self.post_attention_layernorm(self.self_attn(normed, batch), residual)
        return self.mlp(normed), residual

    def forward_gemv(self, x: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` for a step of at most GEMV_MAX_ROWS rows (batch-1 decode), where each projection is a
        matrix-vector product bound by reading its weight: four GEMV kernels, each doing the step before its
        projection (add + RMSNorm, SiLU-and-mul) in its prologue, around the fused attention."""
        import kernels

        attn, mlp, norm1, norm2 = self.self_attn, self.mlp, self.input_layernorm, self.post_attention_layernorm
        if residual is None:
            residual = x
            qkv = kernels.rms_norm_gemv(x, norm1.weight, norm1.eps, attn.qkv_proj.weight, attn.qkv_proj.bias)
        else:
            qkv, residual = kernels.fused_add_rms_norm_gemv(x, residual, norm1.weight, norm1.eps,
                                                            attn.qkv_proj.weight, attn.qkv_proj.bias)
        o = kernels.gemv(attn.attend_fused(qkv, batch), attn.o_proj.weight, attn.o_proj.bias)  # (T, hidden)
        gate_up, residual = kernels.fused_add_rms_norm_gemv(o, residual, norm2.weight, norm2.eps,
                                                            mlp.gate_up_proj.weight)  # (T, 2 * intermediate)
        return kernels.silu_and_mul_gemv(gate_up, mlp.down_proj.weight), residual


class LlamaModel(nn.Module):
    layer_cls = LlamaDecoderLayer

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self.layer_cls(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        self.fused_rope = False  # set with the attention modules' `fused` by use_fused_kernels

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """input_ids: [T] -> final hidden states [T, hidden]."""
        h = self.embed_tokens(input_ids)  # (T, hidden)
        if self.fused_rope:  # the fused attention kernel indexes the float32 tables itself
            batch.rope_tables = self.rotary_emb.tables(h.device)
        else:
            batch.cos, batch.sin = self.rotary_emb.cos_sin(batch.positions, h.dtype)
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

    def use_fused_kernels(self, enabled: bool = True, gemv: bool = True) -> None:
        """Switches RMSNorm (plain and with the residual add), SiLU-and-mul, and the attention's QK-norm + RoPE +
        KV write to the Triton kernels of `kernels/` (CUDA tensors only; the attention backend must then offer
        `attend`), and with `gemv` steps of at most GEMV_MAX_ROWS rows to the GEMV kernels with those steps in
        their prologues (LlamaDecoderLayer.forward_gemv); all reproduce the PyTorch path's bf16 rounding."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, LlamaMLP, LlamaAttention)):
                module.fused = enabled
            if isinstance(module, LlamaDecoderLayer):
                module.gemv = enabled and gemv
        self.model.fused_rope = enabled

    def shift_keys(self, k: torch.Tensor, delta: int) -> torch.Tensor:
        """Rotary-embedded keys [..., kv_heads, head_dim] moved `delta` positions later (RoPE is a rotation per
        frequency, so rotating by delta composes with the rotation already applied); computed in float32."""
        cos, sin = self.model.rotary_emb.cos_sin(torch.tensor([delta], device=k.device), torch.float32)
        return apply_rotary(k.float(), cos, sin).to(k.dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, vocab] in the model's dtype. Not cast to float32 here: greedy rows take
        their argmax as they are, and the engine and sampler convert the rows that need float32 arithmetic."""
        return self.lm_head(hidden)
