"""Mistral on CUDA (Mistral 7B's head size 128 with 4 query heads per KV head, every layer windowed to 64 tokens):
the default FlashInfer + CUDA-graph path against the torch backend, bf16 and fp32 against transformers, and the
window's fallback reported. See tests/support/family_gpu.py."""
from __future__ import annotations

import pytest

from tests.gpu.test_gpu_parity import NEEDS_FLASHINFER
from tests.support import family_gpu

pytestmark = pytest.mark.gpu

SHAPE = dict(vocab_size=49152, hidden_size=1024, intermediate_size=3584, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, head_dim=128, max_position_embeddings=2048, sliding_window=64,
             tie_word_embeddings=False)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory, smollm_tokenizer):
    import transformers

    path = tmp_path_factory.mktemp("gpu-mistral")
    ref32 = family_gpu.gentle_from_config(transformers.MistralConfig(**SHAPE), path, smollm_tokenizer, seed=22)
    return str(path), ref32


@NEEDS_FLASHINFER
def test_default_path_equals_torch_backend_and_reports_window_fallback(mistral):
    paths = family_gpu.check_default_path_against_torch_backend(mistral[0])
    assert family_gpu.has_window_fallback(paths), paths


def test_bf16_error_like_transformers(mistral):
    family_gpu.check_bf16_error_like_transformers(*mistral)


def test_fp32_greedy_equals_transformers(mistral):
    family_gpu.check_fp32_greedy_equals_transformers(*mistral)


@NEEDS_FLASHINFER
def test_cascade_decode_like_plain_without_windows(tmp_path, smollm_tokenizer):
    """Mistral 7B v0.2 / v0.3 set no window: then cascade decode serves it."""
    import transformers

    family_gpu.gentle_from_config(transformers.MistralConfig(**{**SHAPE, "sliding_window": None}), tmp_path,
                                  smollm_tokenizer, seed=27)
    family_gpu.check_cascade_decode_like_plain(str(tmp_path))
