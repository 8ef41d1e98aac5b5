"""Maps a checkpoint's architecture name to the model class that implements it."""
from __future__ import annotations

from torch import nn

from braidinfer.errors import UnsupportedModelError
from braidinfer.models.config import ModelConfig
from braidinfer.models.llama import LlamaForCausalLM
from braidinfer.models.qwen3 import Qwen3ForCausalLM
from braidinfer.models.phi3 import Phi3ForCausalLM
from braidinfer.models.gpt2 import GPT2LMHeadModel

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
}


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    try:
        return ARCHITECTURES[cfg.architecture]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModelError(
            f"architecture {cfg.architecture!r} is not supported; supported architectures: {supported}"
        ) from None
