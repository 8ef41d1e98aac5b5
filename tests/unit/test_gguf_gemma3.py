"""Gemma 3 text GGUFs (llama.cpp's `gemma3` architecture): tensors against the checkpoint they were written from and
against transformers' own GGUF import, config keys from the metadata (llama.cpp's defaults for what the file leaves
out), and the loaded engine's logprobs against the transformers model."""
from __future__ import annotations

import os

import pytest
import torch

from braidinfer import LLM
from braidinfer.loader import resolve_model
from braidinfer.models.config import ModelConfig
from braidinfer.models.gemma3 import Gemma3ForCausalLM
from tests.support.family_parity import assert_logprobs_match, random_prompts
from tests.support.gguf_gemma import assert_same_weights, gguf_weights, randomized_gemma_gguf

# What llama.cpp assumes for a gemma3 file: every sixth layer global, local base 10000, attention scaled by
# head_dim ** -0.5 (query_pre_attn_scalar == head_dim); the model agrees, so transformers is the reference.
SHAPE = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8, sliding_window_pattern=6,
             rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
             max_position_embeddings=256, attn_implementation="eager")


@pytest.fixture(scope="module")
def gemma3_gguf(tmp_path_factory, embedded_gguf):
    import transformers

    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**SHAPE))
    return randomized_gemma_gguf(model, tmp_path_factory.mktemp("gguf-gemma3"), 6, embedded_gguf)


@pytest.fixture(scope="module")
def source(gemma3_gguf):
    return resolve_model(gemma3_gguf[0])  # parsing the header (a 49k-token vocabulary) takes seconds: once


def test_weights_are_the_checkpoints_with_norms_shifted_back(gemma3_gguf, source):
    _, ref = gemma3_gguf
    ours = gguf_weights(source)
    assert "model.layers.0.self_attn.q_norm.weight" in ours
    assert_same_weights(ours, ref.state_dict())


def test_weights_match_transformers_gguf_import(gemma3_gguf, source):
    from transformers import AutoModelForCausalLM

    path, _ = gemma3_gguf
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    assert_same_weights(gguf_weights(source), hf.state_dict())


def test_config_from_metadata(gemma3_gguf, source):
    _, ref = gemma3_gguf
    cfg = ModelConfig.from_hf_config(source.hf_config)
    assert cfg.architecture == "Gemma3ForCausalLM" and cfg.tie_word_embeddings and cfg.head_dim == 16
    with torch.device("meta"):
        model = Gemma3ForCausalLM(cfg)
    assert model.model.layer_types == ref.config.layer_types
    assert [s.sliding_window for s in model.attention_specs()] == [8] * 5 + [None]
    assert model.final_logit_softcapping is None


def test_engine_on_the_gguf_matches_transformers(gemma3_gguf):
    path, ref = gemma3_gguf
    llm = LLM(model=path, device="cpu", dtype="float32", page_size=4, max_num_batched_tokens=32, progress=False)
    try:
        assert_logprobs_match(llm, ref, random_prompts([30], 49152, seed=7)[0], steps=4)
    finally:
        llm.close()
