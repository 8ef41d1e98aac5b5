"""Swapping a model's projections and embedding for their quantised layers (QuantLinear, QuantEmbedding) where the
checkpoint holds those weights quantised: the model is built as usual on the meta device and only the modules that
receive GGUF blocks are replaced, before any memory is allocated, so no float copy of a quantised weight ever exists.
"""
from __future__ import annotations

import torch
from torch import nn

from braidinfer.errors import InvalidModelError
from braidinfer.layers.quant_embedding import QuantEmbedding
from braidinfer.layers.quant_linear import QuantLinear


def module_slot(model: nn.Module, name: str) -> tuple[str, int]:
    """(path of the module that holds checkpoint tensor `name`, first row of it there): a fused projection's part
    goes to the fused module (`packed_slot`), any other tensor to its own."""
    slot = model.packed_slot(name) if hasattr(model, "packed_slot") else None
    param, start = (slot[0], slot[1]) if slot is not None else (name, 0)
    return param.rsplit(".", 1)[0], start


def swap_quantized_modules(model: nn.Module, names: dict[str, str], dtype: torch.dtype, tied: bool) -> dict[str, str]:
    """Replaces, in `model` (on the meta device), each nn.Linear / nn.Embedding that checkpoint tensors `names`
    (HF name -> qtype) fill with a QuantLinear / QuantEmbedding; with `tied` embeddings quantised, the lm_head too.
    Returns module path -> "linear" / "embedding" for every module swapped."""
    swapped: dict[str, str] = {}
    for name in names:
        if not name.endswith(".weight"):
            continue
        path, _ = module_slot(model, name)
        if path in swapped:
            continue
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise InvalidModelError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}") from None
        if isinstance(module, nn.Embedding):
            model.set_submodule(path, QuantEmbedding(module.num_embeddings, module.embedding_dim, dtype))
            swapped[path] = "embedding"
        elif isinstance(module, nn.Linear):
            model.set_submodule(path, _quant_linear(module, dtype))
            swapped[path] = "linear"
        else:
            raise InvalidModelError(f"checkpoint tensor {name!r} is quantised but fills a {type(module).__name__}, "
                                    f"which has no quantised form; load with weight_format='dequantize'")
    if tied and swapped.get("model.embed_tokens") == "embedding" and isinstance(model.lm_head, nn.Linear):
        model.lm_head = _quant_linear(model.lm_head, dtype)
        swapped["lm_head"] = "linear"
    return swapped


def _quant_linear(module: nn.Linear, dtype: torch.dtype) -> QuantLinear:
    return QuantLinear(module.in_features, module.out_features, module.bias is not None, dtype, device="meta")
