"""Qwen2 / Qwen2.5 decoder (and DeepSeek-R1-Distill-Qwen): the Llama block with biases on q, k and v (none on
o_proj), and an optional sliding window on the upper layers.

Parameter names follow Hugging Face's Qwen2ForCausalLM. The window applies only when `use_sliding_window` is true,
to the layers from `max_window_layers` on (or as `layer_types` says); published Qwen2.5 configs leave it off.
"""
from __future__ import annotations

from braidinfer.attention.spec import AttentionSpec
from braidinfer.layers import Linear
from braidinfer.models.config import ModelConfig
from braidinfer.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from braidinfer.models.sliding_window import sliding_window_specs

_MAX_WINDOW_LAYERS = 28  # transformers' Qwen2Config default


class Qwen2Attention(LlamaAttention):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        q_size, kv_size = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        # Qwen2 always biases q, k and v and never o_proj, whatever `attention_bias` says (its config has none).
        self.qkv_proj = Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=True)
        self.o_proj = Linear(q_size, cfg.hidden_size, bias=False)


class Qwen2DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen2Attention


class Qwen2Model(LlamaModel):
    layer_cls = Qwen2DecoderLayer


class Qwen2ForCausalLM(LlamaForCausalLM):
    model_cls = Qwen2Model

    def attention_specs(self) -> list[AttentionSpec]:
        """Plain attention, or a sliding window on the layers from max_window_layers on when use_sliding_window."""
        hf = self.config.hf_config
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        first_windowed = hf.get("max_window_layers", _MAX_WINDOW_LAYERS)
        return sliding_window_specs(self.config, window, lambda i: i >= first_windowed)
