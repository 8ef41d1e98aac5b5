"""Gemma 2 GGUFs (llama.cpp's `gemma2` architecture): tensors against the checkpoint they were written from and
against transformers' own GGUF import, config keys from the metadata, and the loaded engine's logprobs against the
transformers model."""
from __future__ import annotations

import os

import pytest
import torch

from braidinfer import LLM
from braidinfer.loader import resolve_model
from braidinfer.models.config import ModelConfig
from braidinfer.models.gemma2 import Gemma2ForCausalLM
from tests.support.family_parity import assert_logprobs_match, random_prompts
from tests.support.gguf_gemma import assert_same_weights, gguf_weights, randomized_gemma_gguf

# llama.cpp scales attention by head_dim ** -0.5 (query_pre_attn_scalar is not in the file): the model agrees.
SHAPE = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
             attn_logit_softcapping=10.0, final_logit_softcapping=5.0, max_position_embeddings=256,
             attn_implementation="eager")


@pytest.fixture(scope="module")
def gemma2_gguf(tmp_path_factory, embedded_gguf):
    import transformers

    model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**SHAPE))
    return randomized_gemma_gguf(model, tmp_path_factory.mktemp("gguf-gemma2"), 4, embedded_gguf)


@pytest.fixture(scope="module")
def source(gemma2_gguf):
    return resolve_model(gemma2_gguf[0])  # parsing the header (a 49k-token vocabulary) takes seconds: once


def test_weights_are_the_checkpoints_with_norms_shifted_back(gemma2_gguf, source):
    _, ref = gemma2_gguf
    assert_same_weights(gguf_weights(source), ref.state_dict())


def test_weights_match_transformers_gguf_import(gemma2_gguf, source):
    from transformers import AutoModelForCausalLM

    path, _ = gemma2_gguf
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    assert_same_weights(gguf_weights(source), hf.state_dict())


def test_config_from_metadata(gemma2_gguf, source):
    _, ref = gemma2_gguf
    cfg = ModelConfig.from_hf_config(source.hf_config)
    assert cfg.architecture == "Gemma2ForCausalLM" and cfg.tie_word_embeddings and cfg.head_dim == 16
    with torch.device("meta"):
        model = Gemma2ForCausalLM(cfg)
    assert model.final_logit_softcapping == 5.0
    specs = model.attention_specs()
    assert [s.sliding_window for s in specs] == [8, None, 8]
    assert {(s.scale, s.logits_soft_cap) for s in specs} == {(16**-0.5, 10.0)}


def test_engine_on_the_gguf_matches_transformers(gemma2_gguf):
    path, ref = gemma2_gguf
    llm = LLM(model=path, device="cpu", dtype="float32", page_size=4, max_num_batched_tokens=32, progress=False)
    try:
        assert_logprobs_match(llm, ref, random_prompts([30], 49152, seed=5)[0], steps=4)
    finally:
        llm.close()


def test_quantised_matrices_bypass_the_norm_hook():
    """The +1 hook touches only norm weights, so a quantised Gemma file's matrices stay blocks without a decode at
    load; GPT-2 has no tensor hook (its GGUF projections are already in the model's layout)."""
    from braidinfer.loader.gguf_families import FAMILIES

    gemma, gpt2 = FAMILIES["gemma2"], FAMILIES["gpt2"]
    assert gemma.hooks("model.layers.0.post_feedforward_layernorm.weight")
    assert gemma.hooks("model.norm.weight")
    assert not gemma.hooks("model.layers.0.mlp.down_proj.weight")
    assert not gemma.hooks("model.embed_tokens.weight")
    assert not gpt2.hooks("model.layers.3.attn.c_attn.weight") and not gpt2.hooks("model.wpe.weight")
    assert not FAMILIES["llama"].hooks("model.layers.0.mlp.down_proj.weight")  # no hook at all
