"""ERNIE-4.5 dense against transformers: RoPE on interleaved pairs in float32 (q/k rows reordered at load), tied
embeddings, and every projection biased (use_bias) so that each bias is checked."""
from __future__ import annotations

import pytest

from braidinfer import LLM
from tests.conftest import build_tiny_model_from_config
from tests.support.family_parity import assert_greedy_matches, assert_logprobs_match, random_prompts
from tests.support.tiny_checkpoints import randomize_biases

SHAPE = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True)


@pytest.fixture(scope="module", params=[True, False], ids=["use_bias", "no_bias"])
def ernie(request, tmp_path_factory, smollm_tokenizer):
    import transformers

    path = tmp_path_factory.mktemp("tiny-ernie4_5")
    config = transformers.Ernie4_5Config(**SHAPE, use_bias=request.param)
    ref = build_tiny_model_from_config(config, path, smollm_tokenizer, seed=5)
    randomize_biases(ref, path, seed=5)
    llm = LLM(model=str(path), device="cpu", dtype="float32", page_size=4, max_num_batched_tokens=32, progress=False)
    yield llm, ref
    llm.close()


def test_logprobs_match_transformers(ernie):
    llm, ref = ernie
    assert_logprobs_match(llm, ref, random_prompts([40], 49152, seed=0)[0])


def test_greedy_matches_alone_and_batched(ernie):
    llm, ref = ernie
    assert_greedy_matches(llm, ref, random_prompts([5, 17, 38], 49152, seed=1))
