"""Gemma 3 text decoder (Gemma3ForCausalLM, model_type gemma3_text): the Gemma 2 block with QK-norm, and local and
global layers that rotate with different RoPE bases.

What differs from Gemma 2: q and k are normalised per head by (1 + w) RMSNorms before the rotation; sliding
("local") layers rotate with rope_local_base_freq and global layers with rope_theta and its optional scaling;
every sliding_window_pattern-th layer is global (or as `layer_types` lists them); no soft-capping unless the
config asks for it. Parameter names follow Hugging Face's Gemma3ForCausalLM.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from braidinfer.attention.spec import AttentionSpec
from braidinfer.layers import GemmaRMSNorm, PagedAttention, RotaryEmbedding, Rotation
from braidinfer.models.config import ModelConfig
from braidinfer.models.gemma2 import (Gemma2DecoderLayer, Gemma2ForCausalLM, Gemma2Model, gemma_attention_specs,
                                      layer_types)
from braidinfer.models.llama import LlamaAttention

# transformers' Gemma3TextConfig: every sixth layer is global when the config lists no pattern.
DEFAULT_SLIDING_WINDOW_PATTERN = 6


class Gemma3Attention(LlamaAttention):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)  # over head_dim, each head of q
        self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.attn = PagedAttention(layer_idx, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                   q_norm=self.q_norm, k_norm=self.k_norm)


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    attention_cls = Gemma3Attention


class Gemma3Model(Gemma2Model):
    layer_cls = Gemma3DecoderLayer

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.layer_types = layer_types(cfg, DEFAULT_SLIDING_WINDOW_PATTERN)
        self.rotary_embs = {kind: RotaryEmbedding(cfg.head_dim, theta, scaling, cfg.max_position_embeddings)
                            for kind, (theta, scaling) in rope_settings(cfg.hf_config).items()}
        del self.rotary_emb  # Gemma 2's single rotation: here one per kind of layer

    def rotations(self, positions: torch.Tensor) -> list[Rotation]:
        """Each layer's rotation of the step's positions: local layers' base or global layers' base and scaling."""
        by_kind = {kind: rotary.at(positions) for kind, rotary in self.rotary_embs.items()}
        return [by_kind[kind] for kind in self.layer_types]

    def shift_keys(self, k: torch.Tensor, delta: int) -> torch.Tensor:
        """Rotary-embedded keys [..., layers, kv_heads, head_dim] moved `delta` positions later, each layer by the
        rotation it was embedded with."""
        shifted = torch.empty_like(k)
        for kind, rotary in self.rotary_embs.items():
            idx = [i for i, t in enumerate(self.layer_types) if t == kind]
            shifted[..., idx, :, :] = rotary.shift_keys(k[..., idx, :, :], delta)
        return shifted


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    model_cls = Gemma3Model

    def shift_keys(self, k: torch.Tensor, delta: int) -> torch.Tensor:
        """Rotary-embedded keys [..., layers, kv_heads, head_dim] moved `delta` positions later (composed prompts)."""
        return self.model.shift_keys(k, delta)

    def attention_specs(self) -> list[AttentionSpec]:
        """Per layer: scale query_pre_attn_scalar ** -0.5, the sliding window on local layers, the score soft-cap
        when the config sets attn_logit_softcapping (Gemma 3 checkpoints do not)."""
        return gemma_attention_specs(self.config, DEFAULT_SLIDING_WINDOW_PATTERN)


def rope_settings(hf: Mapping[str, Any]) -> dict[str, tuple[float, dict | None]]:
    """(rope base, scaling or None) for "full_attention" and "sliding_attention" layers, from transformers >= 5's
    per-kind rope_parameters or the published configs' rope_theta / rope_scaling / rope_local_base_freq (the
    scaling applies to global layers only)."""
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping) and "full_attention" in params:
        return {kind: (float(p["rope_theta"]), _scaling(p)) for kind, p in params.items()}
    return {"full_attention": (float(hf.get("rope_theta") or 1_000_000.0), _scaling(hf.get("rope_scaling"))),
            "sliding_attention": (float(hf.get("rope_local_base_freq") or 10_000.0), None)}


def _scaling(params: Mapping[str, Any] | None) -> dict | None:
    if params is None or params.get("rope_type", params.get("type", "default")) == "default":
        return None
    return dict(params)

