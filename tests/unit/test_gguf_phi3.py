"""Phi-3 GGUF files laid out as llama.cpp's converter writes them (arch "phi3": fused attn_qkv and ffn_up, LongRoPE
factor tensors, rope.dimension_count for partial rotary, attention.sliding_window) load as the HF checkpoint does."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from braidinfer.loader import resolve_model
from braidinfer.models import ModelConfig, model_class
from braidinfer.weights import load_model


def _tiny_phi3(sliding_window, partial: float, tie: bool, seed: int):
    import transformers

    g = torch.Generator().manual_seed(seed)
    half = int(16 * partial) // 2
    factors = {k: (1 + 3 * torch.rand(half, generator=g)).tolist() for k in ("short_factor", "long_factor")}
    cfg = transformers.Phi3Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  original_max_position_embeddings=32, partial_rotary_factor=partial,
                                  sliding_window=sliding_window, tie_word_embeddings=tie,
                                  rope_scaling={"type": "longrope", **factors}, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2)
    torch.manual_seed(seed)
    model = transformers.Phi3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 4.0)
    return model


def _write_gguf(model, path) -> None:
    """llama.cpp's convert_hf_to_gguf.py Phi3MiniModel: metadata, tensor names, LongRoPE factor tensors."""
    import gguf

    cfg = model.config
    rope = cfg.rope_parameters
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    rope_dims = int(rope["partial_rotary_factor"] * cfg.hidden_size) // cfg.num_attention_heads
    scale = cfg.max_position_embeddings / cfg.original_max_position_embeddings
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_vocab_size(cfg.vocab_size)  # llama.cpp writes the vocabulary; its size is what the loaders read
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_pad_token_id(cfg.pad_token_id)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(rope_dims)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_sliding_window(cfg.sliding_window or 0)  # 0: llama.cpp's mark of a model without one (Phi-4)
    original = cfg.original_max_position_embeddings
    writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(tensor.float().numpy()))
    assert rope_dims <= head_dim
    writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
    writer.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module", params=[(12, 1.0, False), (None, 0.75, True)], ids=["phi3-mini", "phi4-mini"])
def phi3_gguf(request, tmp_path_factory):
    """(GGUF path, HF checkpoint directory, reference model)."""
    model = _tiny_phi3(*request.param, seed=7)
    directory = tmp_path_factory.mktemp("phi3-hf")
    model.save_pretrained(directory)
    path = tmp_path_factory.mktemp("phi3-gguf") / "tiny-phi3.F32.gguf"
    _write_gguf(model, path)
    return str(path), str(directory), model


def _load(path: str):
    cfg = ModelConfig.from_hf_config(resolve_model(path).hf_config)
    return load_model(model_class(cfg), cfg, resolve_model(path), torch.device("cpu"), torch.float32, progress=False)


def test_weights_match_the_hf_state_dict(phi3_gguf):
    path, _, ref = phi3_gguf
    ours = dict(resolve_model(path).iter_weights(torch.float32, progress=False))
    expected = {k: v for k, v in ref.state_dict().items()
                if not (k == "lm_head.weight" and ref.config.tie_word_embeddings)}
    assert set(ours) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name


def test_config_recovers_longrope_partial_rotary_and_window(phi3_gguf):
    path, _, ref = phi3_gguf
    cfg = resolve_model(path).hf_config
    rope = ref.config.rope_parameters
    assert cfg["architectures"] == ["Phi3ForCausalLM"]
    assert cfg["tie_word_embeddings"] is ref.config.tie_word_embeddings
    assert cfg.get("sliding_window") == ref.config.sliding_window
    assert cfg.get("partial_rotary_factor", 1.0) == rope["partial_rotary_factor"]
    scaling = cfg["rope_scaling"]
    assert scaling["rope_type"] == "longrope" and scaling["original_max_position_embeddings"] == 32
    assert "attention_factor" not in scaling  # llama.cpp's stored one is the derived one
    for key in ("long_factor", "short_factor"):
        assert scaling[key] == pytest.approx(rope[key], rel=1e-6), key


@pytest.mark.parametrize("max_model_len", [32, 256], ids=["short", "long"])
def test_loaded_model_equals_the_hf_checkpoint_load(phi3_gguf, max_model_len):
    path, directory, _ = phi3_gguf
    from_gguf, from_hf = _load(path), _load(directory)
    for model in (from_gguf, from_hf):
        model.set_max_model_len(max_model_len)
    a, b = from_gguf.model.rotary_emb, from_hf.model.rotary_emb
    assert a.use_long == b.use_long == (max_model_len > 32)
    torch.testing.assert_close(a.inv_freq, b.inv_freq, rtol=1e-6, atol=0)
    assert a.attention_factor == pytest.approx(b.attention_factor, rel=1e-12)
    assert from_gguf.attention_specs() == from_hf.attention_specs()
    hf_state = from_hf.state_dict()
    for name, tensor in from_gguf.state_dict().items():
        assert torch.equal(tensor, hf_state[name]), name


def test_matches_transformers_gguf_import(phi3_gguf):
    from transformers import AutoModelForCausalLM

    path, _, ref = phi3_gguf
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    ours = dict(resolve_model(path).iter_weights(torch.float32, progress=False))
    for name, tensor in ours.items():
        assert torch.equal(tensor, hf.state_dict()[name].float()), name
