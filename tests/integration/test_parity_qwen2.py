"""Qwen2 against transformers: q/k/v biases, no o_proj bias, and a sliding window on the layers from
max_window_layers on, with prompts longer than the window prefilled in chunks over 4-token pages."""
from __future__ import annotations

import pytest

from braidinfer import LLM
from tests.conftest import build_tiny_model_from_config
from tests.support.family_parity import assert_greedy_matches, assert_logprobs_match, random_prompts
from tests.support.tiny_checkpoints import randomize_biases, window_changes_logits

WINDOW = 8
SHAPE = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


def _config(**overrides):
    import transformers

    return transformers.Qwen2Config(**{**SHAPE, "use_sliding_window": True, "sliding_window": WINDOW,
                                       "max_window_layers": 1, **overrides})


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory, smollm_tokenizer):
    path = tmp_path_factory.mktemp("tiny-qwen2")
    ref = build_tiny_model_from_config(_config(), path, smollm_tokenizer, seed=3)
    randomize_biases(ref, path, seed=3)
    llm = LLM(model=str(path), device="cpu", dtype="float32", page_size=4, max_num_batched_tokens=32, progress=False)
    yield llm, ref
    llm.close()


def test_reference_windows_the_upper_layers(qwen2):
    llm, ref = qwen2
    assert ref.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert window_changes_logits(ref, _config(use_sliding_window=False, layer_types=None), 3 * WINDOW)
    assert [s.sliding_window for s in llm.engine.model.attention_specs()] == [None, WINDOW, WINDOW]


def test_logprobs_match_transformers(qwen2):
    llm, ref = qwen2
    assert_logprobs_match(llm, ref, random_prompts([40], 49152, seed=0)[0])


def test_greedy_matches_alone_and_batched(qwen2):
    llm, ref = qwen2
    assert_greedy_matches(llm, ref, random_prompts([5, 11, 29, 47], 49152, seed=1))
