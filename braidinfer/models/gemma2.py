"""Gemma 2 decoder: the Llama attention with Gemma's numerics around it.

What differs from Llama: (1 + w) RMSNorms computed in float32, four per block (before and after attention, before
and after the MLP, each sublayer's output normalised before it joins the residual stream); a GeGLU MLP with the
tanh GELU; embeddings multiplied by sqrt(hidden) rounded to the model dtype; attention scaled by
query_pre_attn_scalar ** -0.5 with tanh soft-capping of the scores, a sliding window on every other layer
(`layer_types`), and tanh soft-capping of the final logits. Parameter names follow Hugging Face's Gemma2ForCausalLM;
q/k/v and gate/up are fused as in the Llama model.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from braidinfer.attention.spec import AttentionSpec
from braidinfer.errors import UnsupportedModelError
from braidinfer.layers import GeluAndMul, GemmaRMSNorm, Linear, RotaryEmbedding, Rotation
from braidinfer.models.config import ModelConfig
from braidinfer.models.forward_batch import ForwardBatch
from braidinfer.models.llama import LlamaAttention, LlamaForCausalLM

# transformers' ACT2FN names of the GELUs Gemma configs use -> F.gelu's `approximate`.
_GELU_APPROXIMATION = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}


class GemmaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act_fn = GeluAndMul(gelu_approximation(cfg.hf_config))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))  # gelu(gate) * up: (T, inter) -> (T, hidden)


class Gemma2DecoderLayer(nn.Module):
    attention_cls = LlamaAttention

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = self.attention_cls(cfg, layer_idx)
        self.mlp = GemmaMLP(cfg)
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """x: the residual stream [T, hidden] -> the stream after this block."""
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), batch))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma2Model(nn.Module):
    layer_cls = Gemma2DecoderLayer

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_scale = cfg.hidden_size**0.5
        self.layers = nn.ModuleList(self.layer_cls(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """input_ids: [T] -> final hidden states [T, hidden]."""
        h = self.embed_tokens(input_ids)  # (T, hidden)
        h = h * embed_scale_in(self.embed_scale, h.dtype)
        for layer, rope in zip(self.layers, self.rotations(batch.positions)):
            batch.rope = rope  # the rotation this layer's attention reads
            h = layer(h, batch)
        return self.norm(h)

    def rotations(self, positions: torch.Tensor) -> list[Rotation]:
        """Each layer's rotation of the step's positions: one shared by every layer."""
        return [self.rotary_emb.at(positions)] * len(self.layers)


class Gemma2ForCausalLM(LlamaForCausalLM):
    model_cls = Gemma2Model

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.final_logit_softcapping = cfg.hf_config.get("final_logit_softcapping")

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, vocab] in the model's dtype, soft-capped to (-cap, cap) when the
        config sets final_logit_softcapping (the same three operations as transformers, in the model dtype)."""
        logits = self.lm_head(hidden)
        cap = self.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def attention_specs(self) -> list[AttentionSpec]:
        """Per layer: scale query_pre_attn_scalar ** -0.5, the sliding window on "sliding_attention" layers, the
        score soft-cap attn_logit_softcapping."""
        return gemma_attention_specs(self.config, default_pattern=2)


def gemma_attention_specs(cfg: ModelConfig, default_pattern: int) -> list[AttentionSpec]:
    """The AttentionSpecs of a Gemma 2 / 3 config; `default_pattern`: every how many layers one is global when the
    config lists no layer_types (2 for Gemma 2, sliding_window_pattern or 6 for Gemma 3)."""
    hf = cfg.hf_config
    scale = float(hf.get("query_pre_attn_scalar") or cfg.head_dim) ** -0.5
    cap = hf.get("attn_logit_softcapping")
    window = hf.get("sliding_window")
    return [AttentionSpec(scale=scale, sliding_window=window if kind == "sliding_attention" else None,
                          logits_soft_cap=cap)
            for kind in layer_types(cfg, default_pattern)]


def layer_types(cfg: ModelConfig, default_pattern: int) -> list[str]:
    """"sliding_attention" or "full_attention" per layer: the config's layer_types (transformers >= 4.53), else
    every `sliding_window_pattern`-th layer (default `default_pattern`) global, as transformers derives them."""
    hf, n = cfg.hf_config, cfg.num_hidden_layers
    kinds = hf.get("layer_types")
    if kinds is None:
        pattern = hf.get("sliding_window_pattern") or default_pattern
        kinds = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if len(kinds) != n or not set(kinds) <= {"sliding_attention", "full_attention"}:
        raise UnsupportedModelError(f"layer_types must list 'sliding_attention' or 'full_attention' for each of "
                                    f"the {n} layers, got {list(kinds)}")
    if hf.get("sliding_window") is None and "sliding_attention" in kinds:
        kinds = ["full_attention"] * n  # no window configured: transformers attends to everything too
    return list(kinds)


def gelu_approximation(hf: Mapping[str, Any]) -> str:
    """F.gelu's `approximate` for the config's hidden_activation (or the older hidden_act)."""
    name = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if name not in _GELU_APPROXIMATION:
        raise UnsupportedModelError(f"hidden_activation {name!r} is not supported "
                                    f"(supported: {', '.join(_GELU_APPROXIMATION)})")
    return _GELU_APPROXIMATION[name]


def embed_scale_in(scale: float, dtype: torch.dtype) -> float:
    """sqrt(hidden) rounded to `dtype`, as transformers multiplies the embeddings by it (55.4256 becomes 55.5 in
    bf16 for hidden 3072; huggingface/transformers#29402). A Python float, so the multiply stays graph-capturable;
    the product rounds once, like a multiply by the rounded scalar tensor."""
    return torch.tensor(scale, dtype=dtype, device="cpu").item()
