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

    A missing, unexpected or misshapen tensor raises InvalidModelError naming it.
    """
    with torch.device("meta"):
        model = cls(cfg).to(dtype)
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in source.iter_weights(dtype, progress=progress):
        if name.endswith(_IGNORED_SUFFIXES) or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue
        param = params.get(name)
        if param is None:
            raise InvalidModelError(f"checkpoint tensor {name!r} has no place in {cls.__name__}")
        if param.shape != tensor.shape:
            raise InvalidModelError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                    f"{cls.__name__} expects {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor)
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise InvalidModelError(f"checkpoint lacks {len(missing)} tensors of {cls.__name__}, e.g. {missing[:3]}")
    return model.eval()
