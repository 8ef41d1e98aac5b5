"""GPT-2's GGUF (llama.cpp architecture "gpt2") back to its Hugging Face layout.

llama.cpp's converter drops the causal-mask buffers, transposes the Conv1D projections (c_attn, c_proj, c_fc) from
[in, out] to [out, in] (nn.Linear's layout, which the model uses: GPT2LMHeadModel.load_hook takes tensors named in
its own module tree, as the GGUF loader names them, as they are, so quantised projections stay blocks), and writes
the tied head a second time as output.weight.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # gguf_families imports this module for its FAMILIES table
    from braidinfer.loader.gguf_families import MetadataReader


def gpt2_config(meta: MetadataReader, config: dict[str, Any]) -> None:
    """LayerNorm epsilon (GPT-2 norms are not RMS) and GPT-2's activation."""
    # float32 in the file; its shortest repr gives back the config's number (1e-05, not 9.99e-06)
    config["layer_norm_epsilon"] = float(str(np.float32(meta("attention.layer_norm_epsilon", 1e-5))))
    config["activation_function"] = "gelu_new"
