"""Builds a model on its device without a random init and fills it from a checkpoint's tensors."""
from __future__ import annotations

import torch
from torch import nn

from braidinfer.errors import InvalidModelError
from braidinfer.models.config import ModelConfig

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_model(cls: type[nn.Module], cfg: ModelConfig, source, device: torch.device, dtype: torch.dtype,
               progress: bool = True) -> nn.Module:
    """Instantiates `cls(cfg)` on `device` in `dtype` and copies every parameter from `source.iter_weights`.

    A model whose checkpoint names or layouts differ from its parameters (transposed Conv1D weights, permuted rows,
    buffers saved as tensors) defines `load_hook(name, tensor) -> (name, tensor) | None`: each checkpoint tensor goes
    through it first, and None drops it. A missing, unexpected or misshapen tensor raises InvalidModelError naming it.
    """
    with torch.device("meta"):
        model = cls(cfg).to(dtype)
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    params = dict(model.named_parameters())
    filled = {name: 0 for name in params}  # rows filled so far
    hook = getattr(model, "load_hook", None)
    for name, tensor in source.iter_weights(dtype, progress=progress):
        if hook is not None:
            if (renamed := hook(name, tensor)) is None:
                continue
            name, tensor = renamed
        if name.endswith(_IGNORED_SUFFIXES) or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue
        target, rows = _destination(model, params, name, cls.__name__)
        if target.shape != tensor.shape:
            raise InvalidModelError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                    f"{cls.__name__} expects {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor)
        filled[rows[0]] += rows[1]
    missing = sorted(n for n, p in params.items() if filled[n] != p.shape[0])
    if missing:
        raise InvalidModelError(f"checkpoint lacks tensors for {len(missing)} parameters of {cls.__name__}, "
                                f"e.g. {missing[:3]}")
    return model.eval()


def _destination(model: nn.Module, params: dict, name: str, arch: str):
    """The tensor view a checkpoint tensor is copied into, and (parameter name, rows it fills)."""
    slot = model.packed_slot(name) if hasattr(model, "packed_slot") else None
    if slot is not None:
        packed, start, rows = slot
        if packed in params:
            return params[packed][start : start + rows], (packed, rows)
    if name not in params:
        raise InvalidModelError(f"checkpoint tensor {name!r} has no place in {arch}")
    return params[name], (name, params[name].shape[0])
