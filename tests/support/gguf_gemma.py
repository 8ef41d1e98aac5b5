"""Writes a transformers Gemma 2 / Gemma 3 text model as an F32 GGUF the way llama.cpp's convert_hf_to_gguf.py does:
its tensor names, every norm weight stored plus one, its metadata keys, and a tokenizer copied from another GGUF
(the embedded SmolLM2 one, whose vocabulary the tiny test models share) so the engine can load the file alone."""
from __future__ import annotations

import numpy as np

from braidinfer.loader.gguf_file import copy_tokenizer_metadata


def write_gemma_gguf(model, path, tokenizer_gguf: str) -> None:
    """`model`: a Gemma2ForCausalLM or Gemma3ForCausalLM (text) of transformers; `path`: the .gguf to write."""
    import gguf

    cfg = model.config
    arch = {"gemma2": "gemma2", "gemma3_text": "gemma3"}[cfg.model_type]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    else:
        full = cfg.rope_parameters["full_attention"]
        writer.add_rope_freq_base(full["rope_theta"])
        if full.get("rope_type", "default") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(full["factor"])
    copy_tokenizer_metadata(gguf.GGUFReader(tokenizer_gguf), writer)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA2 if arch == "gemma2" else gguf.MODEL_ARCH.GEMMA3,
                                     cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight":  # tied to the embeddings in every Gemma
            continue
        base, suffix = hf_name.rsplit(".", 1)
        data = tensor.float().numpy()
        if hf_name.endswith("norm.weight"):
            data = data + 1  # llama.cpp's Gemma norm multiplies by w, transformers' by 1 + w
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def randomized_gemma_gguf(model, directory, seed: int, tokenizer_gguf: str):
    """`model` (a fresh transformers Gemma 2 / 3) with its norm weights drawn from [-0.5, 2] (zero-centred in
    transformers: a missed -1 at load would show) and its matrices from N(0, 0.1), written to `directory` as an F32
    GGUF; returns (the file's path, the model)."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 2.0)
            elif p.dim() == 2:
                p.normal_(0, 0.1)
    path = directory / f"tiny-{model.config.model_type}.F32.gguf"
    write_gemma_gguf(model.eval(), path, tokenizer_gguf)
    return str(path), model


def gguf_weights(source) -> dict:
    """Every tensor a resolved GGUF source yields, by checkpoint name, in float32."""
    import torch

    return dict(source.iter_weights(torch.float32, progress=False))


def assert_same_weights(ours: dict, ref: dict) -> None:
    """Our tensors equal a transformers state dict's, name for name (the tied lm_head aside)."""
    import torch

    assert set(ours) == set(ref) - {"lm_head.weight"}
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, ref[name].float(), msg=name)
