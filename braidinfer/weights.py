"""Builds a model on its device without a random init and fills it from a checkpoint's tensors."""
from __future__ import annotations

import torch
from torch import nn

from braidinfer.errors import InvalidModelError
from braidinfer.layers.quant_linear import QuantLinear
from braidinfer.loader.quantized import QuantizedTensor
from braidinfer.models.config import ModelConfig
from braidinfer.quant_modules import module_slot, swap_quantized_modules

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_model(cls: type[nn.Module], cfg: ModelConfig, source, device: torch.device, dtype: torch.dtype,
               progress: bool = True, quantized: bool = False, form: str = "blocks") -> nn.Module:
    """Instantiates `cls(cfg)` on `device` in `dtype` and copies every parameter from `source.iter_weights`.

    A model whose checkpoint names or layouts differ from its parameters (transposed Conv1D weights, permuted rows,
    buffers saved as tensors) defines `load_hook(name, tensor) -> (name, tensor) | None`: each checkpoint tensor goes
    through it first, and None drops it. A missing, unexpected or misshapen tensor raises InvalidModelError naming it.

    quantized: the modules the checkpoint's quantised tensors fill (`source.quantized_names()`) become QuantLinear /
    QuantEmbedding (quant_modules.py) holding the blocks; the model's `quantized_modules` names them. form: how
    each QuantLinear holds them (QuantLinear.finalize: "blocks" on CUDA, "int4" or "float" on the CPU).
    """
    with torch.device("meta"):
        model = cls(cfg).to(dtype)
    swapped = swap_quantized_modules(model, source.quantized_names(), dtype, cfg.tie_word_embeddings) \
        if quantized else {}
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings and "lm_head" not in swapped:
        model.lm_head.weight = model.model.embed_tokens.weight
    params = dict(model.named_parameters())
    filled = {name: 0 for name in params}  # rows filled so far
    hook = getattr(model, "load_hook", None)
    for name, tensor in source.iter_weights(dtype, progress=progress, quantized=quantized):
        if hook is not None:
            if (renamed := hook(name, tensor)) is None:
                continue
            name, tensor = renamed
        if name.endswith(_IGNORED_SUFFIXES) or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue
        if swapped and name.endswith(".weight") and (slot := module_slot(model, name))[0] in swapped:
            try:
                _fill_quantized(model.get_submodule(slot[0]), slot[1], tensor, device)
            except ValueError as e:
                raise InvalidModelError(f"checkpoint tensor {name!r}: {e}") from None
            continue
        if isinstance(tensor, QuantizedTensor):  # a load_hook renamed it away from the module swapped for it
            raise InvalidModelError(f"checkpoint tensor {name!r} is quantised but fills no quantised layer of "
                                    f"{cls.__name__}; load with weight_format='dequantize'")
        target, rows = _destination(model, params, name, cls.__name__)
        if target.shape != tensor.shape:
            raise InvalidModelError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                    f"{cls.__name__} expects {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor)
        filled[rows[0]] += rows[1]
    # Embeddings stay quantised (a lookup decodes only its rows) unless tied to an lm_head decoded to float, whose
    # table they then share; tied to an lm_head in the CPU's "dot" form, they read its packed codes.
    for path in swapped:
        module = model.get_submodule(path)
        tied = path == "lm_head" and cfg.tie_word_embeddings
        if tied:
            embedding = model.model.embed_tokens
            module.set_part(0, embedding.quantized() if embedding.qtype else embedding.weight)
        try:
            module.finalize(form) if isinstance(module, QuantLinear) else _check_filled(module)
        except ValueError as e:
            raise InvalidModelError(f"checkpoint tensors for {path} of {cls.__name__}: {e}") from None
        if tied and module.kinds == ["float"] and embedding.qtype:
            embedding.set_weight(module.part0)
        elif tied and module.kinds == ["dot"] and embedding.qtype:
            embedding.share_packed(module.packed_part(0))  # one copy of the table (the dot form's own layout)
    model.quantized_modules = swapped
    missing = sorted(n for n, p in params.items() if filled[n] != p.shape[0])
    if missing:
        raise InvalidModelError(f"checkpoint lacks tensors for {len(missing)} parameters of {cls.__name__}, "
                                f"e.g. {missing[:3]}")
    return model.eval()


def _fill_quantized(module: nn.Module, start: int, tensor, device: torch.device) -> None:
    """Puts a checkpoint tensor (blocks, or a float tensor the loader dequantised) into a swapped module."""
    tensor = tensor.to(device)
    if isinstance(module, QuantLinear):
        module.set_part(start, tensor)
    else:
        module.set_weight(tensor)


def _check_filled(module: nn.Module) -> None:
    if module.weight is None:
        raise ValueError("the embedding table is missing")


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
