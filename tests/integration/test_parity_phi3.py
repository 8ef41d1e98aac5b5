"""Phi-3 family against transformers: LongRoPE with each factor set, partial rotary (Phi-4-mini) and a sliding window.

LongRoPE's factor set: transformers picks it at every forward from the longest position (long once a sequence
exceeds original_max_position_embeddings); the engine picks it once, from the context it serves (long when
max_model_len > original). So the tests choose original_max_position_embeddings = 32 and
- short set: serve max_model_len = 32, every prompt plus output <= 32 tokens (transformers stays short);
- long set: serve the config's 256 positions, every prompt > 32 tokens (transformers is long from the prefill on).
The factors are random in [1, 4], so a wrong set, a missing attention factor or a wrong rotary dim shows in the logits.
"""
from __future__ import annotations

import pytest
import torch

from braidinfer import LLM
from tests.conftest import build_tiny_model_from_config
from tests.support.family_parity import assert_greedy_matches, assert_logprobs_match, random_prompts

VOCAB = 49152
ORIGINAL = 32


def _config(head_dim: int, partial: float, sliding_window: int | None, tie: bool, seed: int):
    import transformers

    g = torch.Generator().manual_seed(seed)
    half = int(head_dim * partial) // 2
    factors = {k: (1 + 3 * torch.rand(half, generator=g)).tolist() for k in ("short_factor", "long_factor")}
    return transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=4 * head_dim, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        original_max_position_embeddings=ORIGINAL, partial_rotary_factor=partial, sliding_window=sliding_window,
        rope_scaling={"type": "longrope", **factors}, tie_word_embeddings=tie, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def phi3(tmp_path_factory, smollm_tokenizer):
    """Phi-3-mini-like: full rotary, sliding window 12 (prompts cross it, prefill chunks across it), untied head."""
    path = tmp_path_factory.mktemp("tiny-phi3")
    ref = build_tiny_model_from_config(_config(16, 1.0, 12, False, seed=3), path, smollm_tokenizer, seed=3)
    return str(path), ref


@pytest.fixture(scope="module")
def phi4_mini(tmp_path_factory, smollm_tokenizer):
    """Phi-4-mini-like: partial_rotary_factor 0.75 (12 of 16 dims rotate), tied embeddings, no window."""
    path = tmp_path_factory.mktemp("tiny-phi4-mini")
    ref = build_tiny_model_from_config(_config(16, 0.75, None, True, seed=4), path, smollm_tokenizer, seed=4)
    return str(path), ref


def _llm(path: str, **kw) -> LLM:
    return LLM(model=path, device="cpu", dtype="float32", page_size=4, max_num_batched_tokens=32, progress=False, **kw)


def _rotary(llm: LLM):
    return llm.engine.model.model.rotary_emb


def test_long_factors_when_serving_beyond_original(phi3):
    path, ref = phi3
    with _llm(path) as llm:
        assert llm.engine.max_model_len == 256 and _rotary(llm).use_long
        assert_logprobs_match(llm, ref, random_prompts([40], VOCAB, seed=1)[0])
        assert_greedy_matches(llm, ref, random_prompts([33, 45, 70], VOCAB, seed=2))


def test_short_factors_when_serving_within_original(phi3):
    path, ref = phi3
    with _llm(path, max_model_len=ORIGINAL) as llm:
        assert not _rotary(llm).use_long
        assert_logprobs_match(llm, ref, random_prompts([20], VOCAB, seed=3)[0])
        assert_greedy_matches(llm, ref, random_prompts([5, 13, 19], VOCAB, seed=4), steps=12)


def test_partial_rotary_long_factors(phi4_mini):
    path, ref = phi4_mini
    with _llm(path) as llm:
        assert _rotary(llm).inv_freq.numel() * 2 == 12
        assert_logprobs_match(llm, ref, random_prompts([40], VOCAB, seed=5)[0])
        assert_greedy_matches(llm, ref, random_prompts([33, 50], VOCAB, seed=6))


def test_partial_rotary_short_factors(phi4_mini):
    path, ref = phi4_mini
    with _llm(path, max_model_len=ORIGINAL) as llm:
        assert_logprobs_match(llm, ref, random_prompts([17], VOCAB, seed=7)[0])
        assert_greedy_matches(llm, ref, random_prompts([6, 18], VOCAB, seed=8), steps=12)


def test_sliding_window_reaches_the_attention_specs(phi3):
    path, _ = phi3
    with _llm(path) as llm:
        assert {s.sliding_window for s in llm.engine.model.attention_specs()} == {12}
