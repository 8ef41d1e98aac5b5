"""Hugging Face model directories: config.json, generation_config.json, tokenizer files and safetensors weights
(single file or sharded)."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import safe_open

from braidinfer.errors import InvalidModelError, UnsupportedModelError
from braidinfer.loader.gguf_file import gguf_files_in
from braidinfer.loader.lfs import check_not_lfs_pointer

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Any one of these lets AutoTokenizer build a tokenizer without the network.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_LEGACY_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt")


class SafetensorsCheckpoint:
    """The weights of a Hugging Face model directory, streamed tensor by tensor with `safe_open`."""

    def __init__(self, path: str, files: list[str], tensor_count: int):
        self.path = path
        self.files = files
        self.tensor_count = tensor_count

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in file order; each tensor is read only when asked for."""
        for file in self.files:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    def load_tokenizer(self) -> Any:
        """AutoTokenizer.from_pretrained on the directory, offline."""
        if not any(os.path.isfile(os.path.join(self.path, f)) for f in TOKENIZER_FILES):
            raise InvalidModelError(f"model directory {self.path} has no tokenizer files "
                                    f"(expected one of: {', '.join(TOKENIZER_FILES)})")
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except Exception as e:  # transformers' errors vary by file: JSON, config validation, a missing class
            raise InvalidModelError(f"the tokenizer of {self.path} cannot be loaded: {type(e).__name__}: {e}") from e


def read_hf_config(path: str) -> dict[str, Any]:
    """The directory's config.json as a dict; InvalidModelError if it is missing or not a JSON object."""
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise InvalidModelError(f"{path} is not a model directory: it has no {CONFIG_FILE}")
    return _read_json_object(file)


def read_generation_config(path: str) -> dict[str, Any]:
    """The directory's generation_config.json as a dict, {} when it has none; InvalidModelError if it is not a JSON
    object. Instruct checkpoints often list their end-of-turn token only there (Llama 3's <|eot_id|>)."""
    file = os.path.join(path, GENERATION_CONFIG_FILE)
    return _read_json_object(file) if os.path.isfile(file) else {}


def check_not_prequantized(path: str, config: dict[str, Any]) -> None:
    """UnsupportedModelError for a checkpoint whose safetensors hold pre-quantised weights (FP8, GPTQ, AWQ,
    bitsandbytes, compressed-tensors: config.json has a quantization_config); the engine loads float weights only,
    and without this check the extra scale tensors fail the load late, one tensor name at a time."""
    quantization = config.get("quantization_config")
    if quantization is None:
        return
    method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else "unknown"
    raise UnsupportedModelError(f"{os.path.join(path, CONFIG_FILE)} has a quantization_config (quant_method "
                                f"{method!r}): Braid does not load pre-quantised safetensors; use the model's bf16 "
                                "checkpoint, or a GGUF of it (e.g. Q4_K_M or Q8_0), which Braid serves quantised")


def _read_json_object(file: str) -> dict[str, Any]:
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidModelError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise InvalidModelError(f"{file} does not hold a JSON object")
    return config


def open_hf_dir(path: str) -> SafetensorsCheckpoint:
    """Finds the directory's safetensors files without reading any tensor data."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        return _open_sharded(path, index)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return SafetensorsCheckpoint(path, [single], _count_tensors(single))
    legacy = [f for f in _LEGACY_WEIGHTS if os.path.exists(os.path.join(path, f))]
    ggufs = gguf_files_in(path)
    hint = f" (found {', '.join(legacy)}; only safetensors weights are supported)" if legacy else ""
    if ggufs:  # config.json makes the directory a safetensors one; a GGUF beside it loads by its own path
        hint += f"; to load a GGUF file instead, pass its path: {', '.join(ggufs)}"
    raise InvalidModelError(f"model directory {path} has {CONFIG_FILE} but no weights: "
                            f"expected {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _open_sharded(path: str, index: str) -> SafetensorsCheckpoint:
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise InvalidModelError(f"{index} is not a valid safetensors index: {e!r}") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InvalidModelError(f"{index} has an empty or malformed weight_map")
    files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise InvalidModelError(f"{index} names shards that are missing: {', '.join(missing)}")
    for file in files:  # a truncated or corrupt shard (an interrupted copy) fails here, not midway through the load
        _count_tensors(file)
    return SafetensorsCheckpoint(path, files, len(weight_map))


def _count_tensors(file: str) -> int:
    check_not_lfs_pointer(file)
    try:  # opening parses only the header table; no tensor data is read
        with safe_open(file, framework="pt", device="cpu") as f:
            return len(f.keys())
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise InvalidModelError(f"{file} is not a valid safetensors file: {e}") from None
