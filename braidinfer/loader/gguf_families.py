"""What differs between llama.cpp's GGUF architectures when mapped back to Hugging Face: one GGUFFamily each.

A family names the HF architecture a `general.architecture` loads as, the GGUF tensor names it adds to (or changes
in) the Llama table of gguf_tensors.py, whether llama.cpp row-permuted its q/k projections, and two optional hooks:
`config(meta, config)` adds the family's own config.json keys from its metadata (`meta(key, default)` reads
"{arch}.{key}"), and `tensor(hf_name, tensor, config)` turns a dequantised tensor back into the HF layout.
A new family is one entry in FAMILIES, with its hooks in a module of its own when they are more than a line.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from braidinfer.loader import gguf_gemma
from braidinfer.loader.gguf_gpt2 import gpt2_config
from braidinfer.loader.gguf_mistral import mistral_if_windowed
from braidinfer.loader.gguf_phi3 import phi3_config

MetadataReader = Callable[[str, Any], Any]


@dataclass(frozen=True)
class GGUFFamily:
    """How one GGUF architecture maps onto a Hugging Face one."""

    architecture: str
    """HF `architectures[0]` the file loads as (a config hook may still change it, e.g. llama -> Mistral)."""
    model_type: str
    """HF `model_type`."""
    layer_names: Mapping[str, str] = field(default_factory=dict)
    """GGUF per-layer tensor stem -> HF submodule path, over (and replacing) the Llama table."""
    global_names: Mapping[str, str] = field(default_factory=dict)
    """GGUF global tensor stem -> HF module path, over the Llama table."""
    permuted_qk: bool = False
    """llama.cpp's converter row-permuted attn_q / attn_k (its llama architecture): undo it at load."""
    config: Callable[[MetadataReader, dict[str, Any]], None] | None = None
    """Adds or changes config.json keys from the family's metadata, in place."""
    tensor: Callable[[str, torch.Tensor, dict[str, Any]], torch.Tensor] | None = None
    """(HF name, float32 tensor, config) -> the tensor in HF layout (e.g. undoing a stored offset)."""
    tensor_names: str = ".*"
    """A regular expression of the HF names `tensor` may change: quantised tensors of other names stay blocks
    without being decoded to check (decoding every matrix of a large file at load takes minutes)."""
    tokenizer_architecture: str | None = None
    """Where transformers cannot read this architecture's GGUF files: one it can, whose tokenizer handling fits
    the family's vocabulary; the tokenizer is built from a copy of the file's tokenizer metadata under that name."""

    def hooks(self, name: str) -> bool:
        """Whether the tensor hook may change the tensor of this HF name."""
        return self.tensor is not None and re.fullmatch(self.tensor_names, name) is not None


FAMILIES: Mapping[str, GGUFFamily] = MappingProxyType({
    "llama": GGUFFamily("LlamaForCausalLM", "llama", permuted_qk=True, config=mistral_if_windowed),
    "qwen3": GGUFFamily("Qwen3ForCausalLM", "qwen3"),
    "qwen2": GGUFFamily("Qwen2ForCausalLM", "qwen2"),
    # llama.cpp keeps ERNIE's interleaved q/k rows (its NORM rope rotates pairs); the model reorders them at load.
    # transformers reads no ernie4_5 GGUF; ERNIE's SentencePiece vocabulary converts as a Llama one.
    "ernie4_5": GGUFFamily("Ernie4_5ForCausalLM", "ernie4_5",
                           config=lambda meta, config: config.update(use_bias=config["attention_bias"]),
                           tokenizer_architecture="llama"),
    "gemma2": GGUFFamily("Gemma2ForCausalLM", "gemma2", layer_names=gguf_gemma.LAYER_NAMES,
                         config=gguf_gemma.gemma2_config, tensor=gguf_gemma.norm_weight,
                         tensor_names=r".*norm\.weight"),
    "gemma3": GGUFFamily("Gemma3ForCausalLM", "gemma3_text", layer_names=gguf_gemma.LAYER_NAMES,
                         config=gguf_gemma.gemma3_config, tensor=gguf_gemma.norm_weight,
                         tensor_names=r".*norm\.weight"),
    "phi3": GGUFFamily("Phi3ForCausalLM", "phi3", layer_names={"attn_qkv": "self_attn.qkv_proj",
                                                               "ffn_up": "mlp.gate_up_proj"}, config=phi3_config),
    "gpt2": GGUFFamily("GPT2LMHeadModel", "gpt2",
                       layer_names={"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
                                    "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
                       global_names={"position_embd": "model.wpe", "output_norm": "model.ln_f"},
                       config=gpt2_config),
})
