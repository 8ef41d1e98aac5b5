"""Phi-3 / Phi-3.5 / Phi-4-mini: the Llama block with LongRoPE, partial rotary embeddings and a sliding window.

Parameter names follow Hugging Face's Phi3ForCausalLM, whose checkpoints already fuse q/k/v into `qkv_proj` (q, k,
v rows) and gate/up into `gate_up_proj` (gate rows, then up rows): the same layout as our fused parameters, so they
load by name. What differs from Llama:
- rotary embeddings on the first `partial_rotary_factor * head_dim` dims of each head (Phi-4-mini: 0.75);
- LongRoPE scaling (braidinfer/layers/longrope.py), its factor set chosen from the served context: the long set when
  max_model_len > original_max_position_embeddings (`set_max_model_len`, called by the engine before serving);
- `sliding_window` when the config sets one (Phi-3-mini-4k: 2047), honoured by every layer's AttentionSpec.
"""
from __future__ import annotations

from torch import nn

from braidinfer.attention.spec import AttentionSpec
from braidinfer.errors import InvalidModelError
from braidinfer.layers import PagedAttention, RMSNorm, RotaryEmbedding
from braidinfer.layers.longrope import LongRoPEEmbedding, is_longrope, original_max_positions
from braidinfer.models.config import ModelConfig
from braidinfer.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


def rotary_dim(cfg: ModelConfig) -> int:
    """How many leading dims of each head rotate: head_dim * partial_rotary_factor (top level in Phi-4-mini's
    config.json, inside rope_parameters in transformers >= 5), as transformers rounds it."""
    params = cfg.hf_config.get("rope_parameters") or {}
    factor = cfg.hf_config.get("partial_rotary_factor") or params.get("partial_rotary_factor") or 1.0
    dim = int(cfg.head_dim * factor)
    if dim <= 0 or dim % 2:
        raise InvalidModelError(f"partial_rotary_factor={factor} gives rotary dim {dim} of head_dim "
                                f"{cfg.head_dim}; it must be even and positive")
    return dim


def rotary_embedding(cfg: ModelConfig, max_model_len: int) -> RotaryEmbedding:
    """Plain or LongRoPE rotary tables over rotary_dim(cfg), for a context of `max_model_len` tokens."""
    dim = rotary_dim(cfg)
    if not is_longrope(cfg.rope_scaling):
        return RotaryEmbedding(dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    original = original_max_positions(cfg.rope_scaling, cfg.hf_config)
    return LongRoPEEmbedding(dim, cfg.rope_theta, cfg.rope_scaling, original, cfg.max_position_embeddings,
                             use_long=max_model_len > original)


class Phi3Attention(LlamaAttention):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.attn = PagedAttention(layer_idx, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                   rotary_dim=rotary_dim(cfg))


class Phi3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Phi3Attention


class Phi3Model(LlamaModel):
    """LlamaModel over Phi-3 layers, with rotary tables over rotary_dim (LongRoPE when configured)."""

    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)  # not LlamaModel's: its tables cover all of head_dim and know no LongRoPE
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Phi3DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Until the engine says otherwise, the context served is the config's whole one.
        self.rotary_emb = rotary_embedding(cfg, cfg.max_position_embeddings)


class Phi3ForCausalLM(LlamaForCausalLM):
    model_cls = Phi3Model

    def set_max_model_len(self, max_model_len: int) -> None:
        """Chooses LongRoPE's factor set for the context the engine serves (a no-op without LongRoPE)."""
        self.model.rotary_emb = rotary_embedding(self.config, max_model_len)

    def attention_specs(self) -> list[AttentionSpec]:
        """Every layer: head_dim ** -0.5, and the config's sliding_window (None: full causal attention)."""
        window = self.config.hf_config.get("sliding_window")
        spec = AttentionSpec(scale=self.config.head_dim**-0.5, sliding_window=window)
        return [spec] * self.config.num_hidden_layers
