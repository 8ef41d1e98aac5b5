"""Writes a transformers model as an F32 GGUF the way llama.cpp's convert_hf_to_gguf.py lays it out: tensor names
from the `gguf` package's map for the architecture, llama's q/k row permutation where the converter applies it, and
the metadata its TextModel writes (plus any family keys the caller adds)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from braidinfer.loader.gguf_file import copy_tokenizer_metadata


def llamacpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's rows from (half, dim) to (dim, half), pairs for its NORM rope."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def add_shape_metadata(writer, cfg) -> None:
    """The size, head, RoPE-base and norm keys llama.cpp's converter writes for a Llama-like transformers config."""
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)


def write_gguf(model, path, arch: str, permute_qk: bool = False, name: str | None = None,
               extra: Callable | None = None, tokenizer_from: str | None = None, qtype: str | None = None,
               quantized_biases: bool = False) -> None:
    """`model`: a transformers causal LM; `arch`: the GGUF architecture name (e.g. "llama" for a Mistral, as
    llama.cpp exports it); `extra(writer)` adds family metadata; `tokenizer_from` names a GGUF whose
    tokenizer.* metadata is copied (so that the file loads with a tokenizer); `qtype` (e.g. "Q8_0") stores the
    2-D weight matrices quantised with the `gguf` package's quantiser (norms and biases stay float32, unless
    `quantized_biases`: biases of whole blocks quantised too, which llama.cpp's converter never writes)."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    if name is not None:
        writer.add_name(name)
    add_shape_metadata(writer, cfg)
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim is not None and arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    elif head_dim is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if extra is not None:
        extra(writer)
    if tokenizer_from is not None:
        copy_tokenizer_metadata(gguf.GGUFReader(tokenizer_from), writer)
    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(model_arch, cfg.num_hidden_layers)
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        data = tensor.float().numpy()
        projection = base.rsplit(".", 1)[-1]
        if permute_qk and projection in heads:
            data = llamacpp_permute(data, heads[projection])
        data = np.ascontiguousarray(data)
        if qtype is not None and (data.ndim == 2 and suffix == "weight" or quantized_biases and suffix == "bias"):
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(f"{names.get_name(base)}.{suffix}", gguf.quants.quantize(data, kind), raw_dtype=kind)
            continue
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
