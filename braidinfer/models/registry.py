"""Maps a checkpoint's architecture name to the model class that implements it."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from braidinfer.errors import UnsupportedModelError
from braidinfer.models.config import ModelConfig
from braidinfer.models.ernie4_5 import Ernie4_5ForCausalLM
from braidinfer.models.gemma2 import Gemma2ForCausalLM
from braidinfer.models.gemma3 import Gemma3ForCausalLM
from braidinfer.models.gpt2 import GPT2LMHeadModel
from braidinfer.models.llama import LlamaForCausalLM
from braidinfer.models.mistral import MistralForCausalLM
from braidinfer.models.phi3 import Phi3ForCausalLM
from braidinfer.models.qwen2 import Qwen2ForCausalLM
from braidinfer.models.qwen3 import Qwen3ForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "MinistralForCausalLM": MistralForCausalLM,
    "Ernie4_5ForCausalLM": Ernie4_5ForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
}


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    check_architecture(cfg.architecture, cfg.hf_config)
    return ARCHITECTURES[cfg.architecture]


def check_architecture(architecture: str, hf_config: Mapping[str, Any]) -> None:
    """UnsupportedModelError naming `architecture` and the supported ones unless a model file implements it."""
    if architecture in ARCHITECTURES:
        return
    multimodal = ""
    if "text_config" in hf_config:  # Gemma3ForConditionalGeneration, Qwen2VLForConditionalGeneration, ...
        multimodal = (" (a multimodal checkpoint: its language model's config is under text_config; Braid serves "
                      "text-only causal language models)")
    supported = ", ".join(sorted(ARCHITECTURES))
    raise UnsupportedModelError(
        f"architecture {architecture!r} is not supported{multimodal}; supported architectures: {supported}")
