"""Architecture-independent description of a decoder-only transformer, read from a Hugging Face config dict."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from braidinfer.errors import InvalidModelError


@dataclass(frozen=True)
class ModelConfig:
    """The shape and numerics of a model; everything a model file needs to build itself."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    """config.json's eos_token_id, then generation_config.json's (transformers' generate stops on the latter;
    instruct checkpoints often list their end-of-turn token only there: Llama 3's 128009, Gemma 2's 107)."""
    hf_config: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The whole config.json (read-only), for the keys only one family has (sliding_window, soft-caps, ...): each
    model file reads and validates its own."""

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], generation_config: Mapping[str, Any] | None = None) -> ModelConfig:
        """Reads a config.json-style dict, and the stop ids of a generation_config.json-style one; an architecture the
        engine does not implement gives an UnsupportedModelError naming it, missing required keys an
        InvalidModelError naming them."""
        from braidinfer.models.registry import check_architecture  # not at the top: the registry imports this module

        cfg = _with_standard_names(cfg)
        archs = cfg.get("architectures") or []
        architecture = archs[0] if archs else _architecture_from_model_type(cfg.get("model_type"))
        check_architecture(architecture, cfg)  # first: a multimodal config keeps its sizes under text_config
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        missing = [k for k in required if k not in cfg]
        if missing:
            raise InvalidModelError(f"model config lacks required keys: {', '.join(missing)}")
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        eos_ids = _token_ids(cfg.get("eos_token_id"), "config.json eos_token_id")
        eos_ids += _token_ids((generation_config or {}).get("eos_token_id"), "generation_config.json eos_token_id")
        rope_theta = cfg.get("rope_theta")
        rope_scaling = cfg.get("rope_scaling")
        params = cfg.get("rope_parameters")  # transformers >= 5 folds theta and scaling into one dict
        if isinstance(params, dict):
            rope_theta = rope_theta or params.get("rope_theta")
            if params.get("rope_type", "default") != "default":
                rope_scaling = rope_scaling or params
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
            rope_scaling = None
        return cls(
            architecture=architecture,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(eos_ids)),
            hf_config=MappingProxyType(dict(cfg)),
        )


# GPT-2-era configs name the shape differently (transformers' GPT2Config.attribute_map).
_ALIASES = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
            "n_positions": "max_position_embeddings", "n_inner": "intermediate_size"}

# Families whose transformers config defaults tie_word_embeddings to True: their published config.json files leave
# it out and their checkpoints hold no lm_head.weight.
_TIED_BY_DEFAULT = frozenset({"gemma", "gemma2", "gemma3_text", "gpt2"})  # GPT2Config ties by default too


def _with_standard_names(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = dict(cfg)
    for alias, name in _ALIASES.items():
        if alias in cfg and name not in cfg:
            cfg[name] = cfg[alias]
    if cfg.get("intermediate_size") is None and cfg.get("model_type") == "gpt2" and "hidden_size" in cfg:
        cfg["intermediate_size"] = 4 * cfg["hidden_size"]  # GPT-2's n_inner=None means 4 * n_embd
    if cfg.get("model_type") in _TIED_BY_DEFAULT:
        cfg.setdefault("tie_word_embeddings", True)
    return cfg


def _token_ids(value: Any, key: str) -> tuple[int, ...]:
    """A token-id setting (None, an id, or a list of ids) as a tuple; InvalidModelError naming `key` otherwise."""
    ids = [] if value is None else value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise InvalidModelError(f"{key} must be a token id or a list of token ids, not {value!r}")
    return tuple(ids)


def _architecture_from_model_type(model_type: str | None) -> str:
    known = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
             "mistral": "MistralForCausalLM", "ministral": "MistralForCausalLM", "gemma2": "Gemma2ForCausalLM",
             "gemma3_text": "Gemma3ForCausalLM",
             "phi3": "Phi3ForCausalLM", "gpt2": "GPT2LMHeadModel", "ernie4_5": "Ernie4_5ForCausalLM"}
    if model_type not in known:
        raise InvalidModelError(f"model config names no architecture (model_type={model_type!r})")
    return known[model_type]
