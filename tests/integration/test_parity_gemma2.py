"""Gemma 2 against transformers: a tiny random checkpoint (float32, CPU) with soft-capping that bends both the
attention scores and the final logits, a sliding window of 8 on alternating layers, and prompts several windows long
prefilled in chunks over pages of 4 tokens."""
from __future__ import annotations

import pytest
import torch

from braidinfer import LLM
from tests.support.family_parity import assert_greedy_matches, assert_logprobs_match, random_prompts
from tests.conftest import build_tiny_model_from_config

WINDOW = 8
# Random N(0, 0.1) weights give attention scores up to ~30 and logits up to ~14 at this size: these caps bend both.
ATTN_CAP, FINAL_CAP = 10.0, 5.0


def gemma2_config(**overrides):
    from transformers import Gemma2Config

    shape = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
                 attn_logit_softcapping=ATTN_CAP, final_logit_softcapping=FINAL_CAP, max_position_embeddings=256,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager")
    return Gemma2Config(**{**shape, **overrides})


@pytest.fixture(scope="module")
def engine(tmp_path_factory, smollm_tokenizer):
    path = tmp_path_factory.mktemp("tiny-gemma2")
    ref = build_tiny_model_from_config(gemma2_config(), path, smollm_tokenizer)
    llm = LLM(model=str(path), device="cpu", dtype="float32", page_size=4, max_num_batched_tokens=32, progress=False)
    yield llm, ref
    llm.close()


def test_soft_caps_change_the_reference(engine):
    # Guards the test itself: with the caps lifted transformers' logits differ, so parity below covers them.
    _, ref = engine
    ids = torch.tensor(random_prompts([40], 49152, seed=3))
    with torch.no_grad():
        capped = ref(ids).logits
        ref.config.final_logit_softcapping, ref.config.attn_logit_softcapping = None, None
        for layer in ref.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        try:
            plain = ref(ids).logits
        finally:
            ref.config.final_logit_softcapping, ref.config.attn_logit_softcapping = FINAL_CAP, ATTN_CAP
            for layer in ref.model.layers:
                layer.self_attn.attn_logit_softcapping = ATTN_CAP
    assert capped.abs().max() < FINAL_CAP
    assert (capped - plain).abs().max() > 1.0


def test_prefill_and_decode_logprobs_match_transformers(engine):
    llm, ref = engine
    assert_logprobs_match(llm, ref, random_prompts([40], 49152)[0])


def test_greedy_continuations_match_alone_and_in_mixed_batches(engine):
    llm, ref = engine
    assert_greedy_matches(llm, ref, random_prompts([5, 17, 40, 61], 49152, seed=1))


def test_attention_specs_follow_the_config():
    from braidinfer.models.config import ModelConfig
    from braidinfer.models.gemma2 import Gemma2ForCausalLM

    with torch.device("meta"):
        model = Gemma2ForCausalLM(ModelConfig.from_hf_config(gemma2_config().to_dict()))
    specs = model.attention_specs()
    assert [s.sliding_window for s in specs] == [WINDOW, None, WINDOW]  # transformers: even layers slide
    assert {s.scale for s in specs} == {24**-0.5}
    assert {s.logits_soft_cap for s in specs} == {ATTN_CAP}
