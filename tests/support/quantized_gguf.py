"""Tiny GGUF checkpoints with quantised tensors, written from a transformers model the way llama.cpp lays them out
(tensor names, llama q/k row permutation, metadata), together with their reference: the same transformers model
with every quantised weight replaced by gguf.quants.dequantize of the bytes written, so that the model computes
exactly what the file holds.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from tests.support.gguf_export import add_shape_metadata, llamacpp_permute
from tests.support.gguf_quant import ENCODED, quantize

QTypeOf = Callable[[str], "str | None"]
"""HF parameter name -> GGML type name to store it in ("Q4_K", "Q5_0", ...), or None for F32."""


def write_quantized_gguf(model, path, qtype_of: QTypeOf) -> dict[str, str]:
    """Writes `model` (a transformers Llama or Qwen3) to the GGUF file `path`, each tensor in qtype_of(name), and
    replaces the model's quantised weights in place by their dequantised values. Returns HF name -> qtype written."""
    import gguf
    from gguf.quants import dequantize
    from gguf.quants import quantize as gguf_quantize

    cfg = model.config
    arch = cfg.model_type
    writer = gguf.GGUFWriter(str(path), arch)
    add_shape_metadata(writer, cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    else:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     cfg.num_hidden_layers)
    written = {}
    params = dict(model.named_parameters())
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        data = tensor.float().numpy()
        qtype = qtype_of(hf_name)
        if qtype is not None:
            # Rows are independent: quantising before permuting rows is the same. gguf writes the other types.
            data = (quantize(data, qtype) if qtype in ENCODED
                    else gguf_quantize(data, gguf.GGMLQuantizationType[qtype]))
            with torch.no_grad():
                values = dequantize(data, gguf.GGMLQuantizationType[qtype])
                params[hf_name].copy_(torch.from_numpy(values.reshape(tensor.shape)))
            written[hf_name] = qtype
        if arch == "llama" and base.endswith("q_proj"):
            data = llamacpp_permute(data, cfg.num_attention_heads)
        elif arch == "llama" and base.endswith("k_proj"):
            data = llamacpp_permute(data, cfg.num_key_value_heads)
        raw = {} if qtype is None else {"raw_dtype": gguf.GGMLQuantizationType[qtype]}
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(data), **raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def with_int4_linears(model, path, form: str = "int4"):
    """A copy of the transformers `model` whose projections (and lm_head, from the embedding when tied) are
    QuantLinears in a CPU form ("int4": torch's int4 op; "dot": braid_kernels/cpu_quant.c) built from the GGUF file
    `path`'s quantised tensors: the reference for the engine's form, everything else computed by transformers."""
    import copy

    from braidinfer.layers.quant_linear import QuantLinear
    from braidinfer.loader.gguf_file import open_gguf
    from braidinfer.loader.quantized import QuantizedTensor

    model = copy.deepcopy(model)
    _, checkpoint = open_gguf(str(path))
    tied = model.config.tie_word_embeddings
    for name, tensor in checkpoint.tensors(quantized=True):
        if not isinstance(tensor, QuantizedTensor):
            continue
        path_ = name.rsplit(".", 1)[0]
        if path_ == "model.embed_tokens":
            if not tied:
                continue
            path_ = "lm_head"
        linear = model.get_submodule(path_)
        layer = QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, torch.float32)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        layer.set_part(0, tensor)
        layer.finalize(form)
        model.set_submodule(path_, layer)
    return model.eval()
