"""GPT-2's GGUF (llama.cpp architecture "gpt2") back to its Hugging Face layout.

llama.cpp's converter drops the causal-mask buffers, transposes the Conv1D projections (c_attn, c_proj, c_fc) from
[in, out] to [out, in], and writes the tied head a second time as output.weight. The tensor hook transposes the
projections back, so the model's load_hook sees the same layout as from a transformers checkpoint.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # gguf_families imports this module for its FAMILIES table
    from braidinfer.loader.gguf_families import MetadataReader

_CONV1D = re.compile(r".*\.(c_attn|c_proj|c_fc)\.weight")


def gpt2_config(meta: MetadataReader, config: dict[str, Any]) -> None:
    """LayerNorm epsilon (GPT-2 norms are not RMS) and GPT-2's activation."""
    # float32 in the file; its shortest repr gives back the config's number (1e-05, not 9.99e-06)
    config["layer_norm_epsilon"] = float(str(np.float32(meta("attention.layer_norm_epsilon", 1e-5))))
    config["activation_function"] = "gelu_new"


def gpt2_tensor(name: str, tensor: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """Conv1D projections back to [in, out]; every other tensor is stored as transformers holds it."""
    return tensor.t().contiguous() if _CONV1D.fullmatch(name) else tensor
