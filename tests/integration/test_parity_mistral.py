"""Mistral (sliding window on every layer, explicit head_dim) and Ministral (windowed layers named by layer_types)
against transformers, with prompts longer than the window prefilled in chunks over 4-token pages."""
from __future__ import annotations

import pytest

from braidinfer import LLM
from tests.conftest import build_tiny_model_from_config
from tests.support.family_parity import assert_greedy_matches, assert_logprobs_match, random_prompts
from tests.support.tiny_checkpoints import window_changes_logits

WINDOW = 8
SHAPE = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=False)
MINISTRAL_LAYERS = ["sliding_attention", "full_attention", "sliding_attention"]


def _config(model_type: str, **overrides):
    import transformers

    cls = {"mistral": transformers.MistralConfig, "ministral": transformers.MinistralConfig}[model_type]
    extra = {"layer_types": MINISTRAL_LAYERS} if model_type == "ministral" else {}
    return cls(**{**SHAPE, "sliding_window": WINDOW, **extra, **overrides})


@pytest.fixture(scope="module", params=["mistral", "ministral"])
def mistral(request, tmp_path_factory, smollm_tokenizer):
    model_type = request.param
    path = tmp_path_factory.mktemp(f"tiny-{model_type}")
    ref = build_tiny_model_from_config(_config(model_type), path, smollm_tokenizer, seed=4)
    llm = LLM(model=str(path), device="cpu", dtype="float32", page_size=4, max_num_batched_tokens=32, progress=False)
    yield model_type, llm, ref
    llm.close()


def test_windows_as_the_reference(mistral):
    model_type, llm, ref = mistral
    # Ministral builds its sliding mask whenever it has a window, so it goes unwindowed through layer_types.
    unwindowed = (_config(model_type, layer_types=["full_attention"] * 3) if model_type == "ministral"
                  else _config(model_type, sliding_window=None))
    assert window_changes_logits(ref, unwindowed, 3 * WINDOW)
    windows = [s.sliding_window for s in llm.engine.model.attention_specs()]
    assert windows == ([WINDOW] * 3 if model_type == "mistral" else [WINDOW, None, WINDOW])


def test_logprobs_match_transformers(mistral):
    _, llm, ref = mistral
    assert_logprobs_match(llm, ref, random_prompts([40], 49152, seed=0)[0])


def test_greedy_matches_alone_and_batched(mistral):
    _, llm, ref = mistral
    assert_greedy_matches(llm, ref, random_prompts([5, 13, 31, 45], 49152, seed=1))


def test_null_window_is_plain_attention():
    """Mistral v0.2+ configs say sliding_window: null: every layer attends to the whole prefix."""
    import torch

    from braidinfer.models.config import ModelConfig
    from braidinfer.models.mistral import MistralForCausalLM

    cfg = ModelConfig.from_hf_config(_config("mistral", sliding_window=None).to_dict())
    with torch.device("meta"):
        specs = MistralForCausalLM(cfg).attention_specs()
    assert [s.sliding_window for s in specs] == [None] * 3
