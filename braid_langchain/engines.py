"""One engine per (model, device, dtype, further engine settings) per process, shared by every ChatBraid, loaded
on first use.

Sharing is what makes reuse work across instances: two ChatBraid objects with the same system prompt read the
same KV pages. Loading takes seconds, so it happens on the first request, never at construction. An engine that was
closed or whose loop died is replaced by a fresh one on the next request.

The registry is per process: a process forked from one that had engines starts with none (the parent's engine
threads do not exist in it), so its ChatBraid loads a fresh engine on first use.
"""
from __future__ import annotations

import functools
import os
import threading
from typing import TYPE_CHECKING, Any

from braid_langchain.pinning import drop_pins

if TYPE_CHECKING:
    from braidinfer import LLM

EngineKey = tuple  # (model, device, dtype) as the engine resolves them, then sorted further EngineConfig settings

_engines: dict[EngineKey, LLM] = {}
_lock = threading.Lock()


def engine_key(model: str | None, device: str | None, dtype: str = "auto", **engine_kwargs: Any) -> EngineKey:
    """The registry key of one engine configuration (`engine_kwargs`: further `EngineConfig` fields), with device
    and dtype as the engine would resolve them, so that equivalent settings share one engine: on a CPU-only host
    device None and "cpu" are one key, "cuda" and "cuda:0" are one, dtype "auto" is the dtype it stands for, and a
    local model path is its real absolute path ("model.gguf", "./model.gguf" and its absolute path are one key)."""
    return (_model_key(model), *_placement(device, dtype), *sorted(engine_kwargs.items()))


_path_keys: dict[str, str] = {}  # a local model path as written -> its key, fixed when first seen


def _model_key(model: str | None) -> str | None:
    """An existing local path as its real absolute path (as the engine opens it: `~` expanded); else as given.

    A path's key is kept once found: no file system calls on the request path after the first, and an engine whose
    path was moved or re-linked since it loaded is still found (and closed) by the path it was asked for."""
    if model is None:
        return None
    text = os.fspath(model)
    key = _path_keys.get(text)
    if key is None:
        from braidinfer.loader.resolve import local_model_path

        path = local_model_path(text)  # what the engine loads from, as it decides it
        if path is None:
            return text
        key = _path_keys[text] = os.path.realpath(path)
    return key


def get_engine(model: str | None, device: str | None, dtype: str = "auto", **engine_kwargs: Any) -> LLM:
    """The shared engine for `model` on `device` with these settings, loading it the first time (the engine's
    errors pass through: an unknown model path raises `braidinfer.errors.ModelNotFoundError`)."""
    key = engine_key(model, device, dtype, **engine_kwargs)
    engine = _engines.get(key)
    if engine is not None and engine.alive:
        return engine
    with _lock:  # loads are rare and heavy: one at a time, and never twice for one key
        engine = _engines.get(key)
        if engine is None or not engine.alive:
            if engine is not None:
                _close(engine)  # dead or closed already: this lets go of its chunks and thread
            from braidinfer import LLM

            engine = _engines[key] = LLM(model=model, device=device, dtype=dtype, progress=False, **engine_kwargs)
        return engine


def is_loaded(model: str | None, device: str | None, dtype: str = "auto", **engine_kwargs: Any) -> bool:
    """True when the engine is loaded and serving (get_engine then returns it at once, without loading)."""
    engine = _engines.get(engine_key(model, device, dtype, **engine_kwargs))
    return engine is not None and engine.alive


def close_engine(model: str | None, device: str | None, dtype: str = "auto", **engine_kwargs: Any) -> None:
    """Closes one shared engine, freeing its weights and KV pages (it loads again on next use)."""
    with _lock:
        engine = _engines.pop(engine_key(model, device, dtype, **engine_kwargs), None)
    if engine is not None:
        _close(engine)


def close_all() -> None:
    """Closes every shared engine (they load again on next use)."""
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        _close(engine)


def _placement(device: str | None, dtype: str) -> tuple[str | None, str]:
    """(device, dtype) resolved as `braidinfer.engine.LLMEngine` resolves them, without loading anything; a device
    the engine would refuse stays as given (loading it raises the engine's error)."""
    device, dtype = _resolved(device, dtype)
    if device == "cuda":
        import torch

        # A bare "cuda" is the current device: 0 until the process picks another, which initialises CUDA (not
        # done here: a process that initialised CUDA can no longer fork working children).
        device = f"cuda:{torch.cuda.current_device() if torch.cuda.is_initialized() else 0}"
    return device, dtype


@functools.lru_cache(maxsize=64)
def _resolved(device: str | None, dtype: str) -> tuple[str | None, str]:
    """`_placement` but for a bare "cuda", kept as is; cached, since every call looks its engine up and
    probing CUDA and building a torch.device took ~3 us of each lookup (measured on CPU)."""
    from braidinfer.engine import pick_device, pick_dtype
    from braidinfer.errors import InvalidRequestError

    try:
        picked = pick_device(device)
    except InvalidRequestError:
        return device, dtype
    try:
        dtype = str(pick_dtype(dtype, picked)).removeprefix("torch.")
    except KeyError:  # not a dtype: EngineConfig refuses it when the engine is built
        pass
    return str(picked), dtype


def _close(engine: LLM) -> None:
    """Closes `engine` and drops ChatBraid's pins on it (they would otherwise live until the engine is collected)."""
    drop_pins(engine)
    engine.close()


def _forget_parent_engines() -> None:
    """Runs in a forked child: the parent's engines cannot serve here (their threads stayed in the parent), and the
    lock may have been held by a parent thread at the fork."""
    global _lock
    _lock = threading.Lock()
    _engines.clear()


if hasattr(os, "register_at_fork"):  # POSIX only; elsewhere processes are spawned, not forked
    os.register_at_fork(after_in_child=_forget_parent_engines)
