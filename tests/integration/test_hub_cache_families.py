"""Every added family loads by hub id from the local Hugging Face cache (the layout huggingface_hub writes:
refs/main -> snapshots/<commit>/ links into blobs/) and computes what transformers computes from the same files
(top-5 logprobs at prefill and decode, tests/support/family_parity.py). The tiny configs are the parity tests'; the
40-token prompt is longer than the tiny Phi-3's original context, so transformers serves the long LongRoPE factors
as the engine (which serves 256 tokens) does."""
from __future__ import annotations

import pytest

from braidinfer import LLM
from tests.conftest import build_tiny_model_from_config
from tests.integration import (
    test_parity_ernie4_5,
    test_parity_gemma2,
    test_parity_gemma3,
    test_parity_gpt2,
    test_parity_mistral,
    test_parity_phi3,
    test_parity_qwen2,
)
from tests.support.family_parity import assert_logprobs_match, random_prompts
from tests.unit.test_loader import _fake_hub_cache


def _ernie():
    import transformers

    return transformers.Ernie4_5Config(**test_parity_ernie4_5.SHAPE)


CONFIGS = {
    "qwen2": test_parity_qwen2._config,
    "mistral": lambda: test_parity_mistral._config("mistral"),
    "gemma2": test_parity_gemma2.gemma2_config,
    "gemma3": test_parity_gemma3.gemma3_config,
    "phi3": lambda: test_parity_phi3._config(16, 1.0, 12, False, seed=3),
    "gpt2": test_parity_gpt2._config,
    "ernie4_5": _ernie,
}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_a_family_loads_from_the_hub_cache_by_id(family, tmp_path, monkeypatch, smollm_tokenizer):
    model_dir = tmp_path / "model"
    ref = build_tiny_model_from_config(CONFIGS[family](), model_dir, smollm_tokenizer, seed=7)
    snapshot = _fake_hub_cache(tmp_path / "hub", f"org/tiny-{family}", str(model_dir))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with LLM(model=f"org/tiny-{family}", device="cpu", dtype="float32", page_size=4, progress=False) as llm:
        assert llm.engine.source.path == str(snapshot)
        assert_logprobs_match(llm, ref, random_prompts([40], 49152, seed=1)[0], steps=4)
