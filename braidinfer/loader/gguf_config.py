"""A Hugging Face config.json-style dict synthesised from a GGUF file's metadata."""
from __future__ import annotations

from typing import Any

import numpy as np
from gguf import GGUFReader, dequantize

from braidinfer.errors import InvalidModelError, UnsupportedModelError
from braidinfer.loader.gguf_families import FAMILIES
from braidinfer.loader.gguf_phi3 import FACTOR_TENSORS, longrope_scaling
from braidinfer.loader.gguf_rope import llama3_rope_scaling

# HF key -> GGUF key under "{arch}."
_REQUIRED = {
    "num_hidden_layers": "block_count",
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count",
}
_YARN_KEYS = {  # GGUF "{arch}.rope.scaling.*" -> HF rope_scaling key
    "original_context_length": "original_max_position_embeddings",
    "yarn_beta_fast": "beta_fast",
    "yarn_beta_slow": "beta_slow",
    "attn_factor": "attention_factor",
}


def gguf_architecture(reader: GGUFReader, path: str) -> str:
    """The file's `general.architecture`; UnsupportedModelError unless the engine implements it."""
    arch = metadata(reader, "general.architecture")
    if arch is None:
        raise InvalidModelError(f"{path} has no general.architecture metadata")
    if arch not in FAMILIES:
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported "
                                    f"(supported: {', '.join(sorted(FAMILIES))})")
    return arch


def gguf_hf_config(reader: GGUFReader, path: str) -> dict[str, Any]:
    """config.json keys (architectures, model_type, sizes, rope, tying, special tokens) from the GGUF metadata."""
    arch = gguf_architecture(reader, path)

    def meta(key: str, default: Any = None) -> Any:
        return metadata(reader, f"{arch}.{key}", default)

    missing = [f"{arch}.{key}" for key in _REQUIRED.values() if meta(key) is None]
    if missing:
        raise InvalidModelError(f"{path} lacks GGUF metadata: {', '.join(missing)}")
    family = FAMILIES[arch]
    config: dict[str, Any] = {"architectures": [family.architecture], "model_type": family.model_type}
    config.update({hf: _per_model(meta(key), f"{arch}.{key}") for hf, key in _REQUIRED.items()})
    kv_heads = meta("attention.head_count_kv", config["num_attention_heads"])
    config["num_key_value_heads"] = _per_model(kv_heads, f"{arch}.attention.head_count_kv")
    config["vocab_size"] = _vocab_size(reader, arch)
    head_dim = _head_dim(reader, arch)
    if head_dim is not None:
        config["head_dim"] = head_dim
    config["rms_norm_eps"] = _float32(meta("attention.layer_norm_rms_epsilon", 1e-6))
    config["rope_theta"] = _float32(meta("rope.freq_base", 10000.0))
    config["max_position_embeddings"] = int(meta("context_length", 2048))
    names = {t.name for t in reader.tensors}
    config["tie_word_embeddings"] = "output.weight" not in names
    config["attention_bias"] = "blk.0.attn_q.bias" in names
    config.update(_special_tokens(reader))
    rope_scaling = _rope_scaling(reader, arch, config)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    if family.config is not None:
        family.config(meta, config)
    return config


def metadata(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """A scalar or string GGUF metadata value as a Python value, or `default` when absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _per_model(value: Any, key: str) -> int:
    # Some GGUFs store head counts per layer; the engine's models need one value for all layers.
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise UnsupportedModelError(f"GGUF metadata {key} varies across layers ({sorted(set(value))})")
        value = value[0]
    return int(value)


def _vocab_size(reader: GGUFReader, arch: str) -> int:
    size = metadata(reader, f"{arch}.vocab_size")
    if size is not None:
        return int(size)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:  # len(data) counts the array's items without decoding 100k+ strings
        return len(tokens.data)
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return int(embed.shape[-1])  # GGUF shapes list the fastest-varying (hidden) dimension first


def _head_dim(reader: GGUFReader, arch: str) -> int | None:
    # Qwen3 states it (attention.key_length); for llama, rope.dimension_count is the head size (transformers reads
    # it so too). Left out otherwise: the engine derives hidden_size // num_attention_heads.
    value = metadata(reader, f"{arch}.attention.key_length")
    if value is None and arch == "llama":
        value = metadata(reader, f"{arch}.rope.dimension_count")
    return None if value is None else int(value)


def _special_tokens(reader: GGUFReader) -> dict[str, Any]:
    ids = {k: metadata(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "eot", "eom", "padding")}
    tokens: dict[str, Any] = {}
    if ids["bos"] is not None:
        tokens["bos_token_id"] = int(ids["bos"])
    # llama.cpp stops on end-of-turn / end-of-message tokens too; HF configs list them among eos_token_id.
    eos = list(dict.fromkeys(int(ids[k]) for k in ("eos", "eot", "eom") if ids[k] is not None))
    if eos:
        tokens["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if ids["padding"] is not None:
        tokens["pad_token_id"] = int(ids["padding"])
    return tokens


def _rope_scaling(reader: GGUFReader, arch: str, config: dict[str, Any]) -> dict[str, Any] | None:
    kind = metadata(reader, f"{arch}.rope.scaling.type")
    if kind not in (None, "none"):
        factor = float(metadata(reader, f"{arch}.rope.scaling.factor", 1.0))
        scaling: dict[str, Any] = {"rope_type": kind, "factor": factor}
        for gguf_key, hf_key in _YARN_KEYS.items():
            value = metadata(reader, f"{arch}.rope.scaling.{gguf_key}")
            if value is not None:
                scaling[hf_key] = value
        return scaling
    factors = {key: t for t in reader.tensors for key, name in FACTOR_TENSORS.items() if t.name == name}
    if factors:
        arrays = {key: dequantize(t.data, t.tensor_type) for key, t in factors.items()}
        return longrope_scaling(arrays, lambda key, default=None: metadata(reader, f"{arch}.{key}", default), config)
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is None:
        return None
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return llama3_rope_scaling(dequantize(freqs.data, freqs.tensor_type), head_dim, config["rope_theta"])


def _float32(value: float) -> float:
    # GGUF stores these as float32; the shortest float32 repr gives back the config's number (1e-05, not 9.99e-06).
    return float(str(np.float32(value)))
