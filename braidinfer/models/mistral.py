"""Mistral 7B (v0.1-v0.3) and Ministral: the Llama block with a sliding-window attention.

Parameter names follow Hugging Face's MistralForCausalLM. `sliding_window` (null from v0.2 on) windows every layer;
Ministral configs list the windowed layers in `layer_types`. head_dim may be given explicitly (Ministral, Nemo).
"""
from __future__ import annotations

from braidinfer.attention.spec import AttentionSpec
from braidinfer.models.llama import LlamaForCausalLM
from braidinfer.models.sliding_window import sliding_window_specs


class MistralForCausalLM(LlamaForCausalLM):
    def attention_specs(self) -> list[AttentionSpec]:
        """Every layer windowed to `sliding_window` tokens (or the layers `layer_types` names); plain when null."""
        return sliding_window_specs(self.config, self.config.hf_config.get("sliding_window"), lambda i: True)
