"""Qwen2 on CUDA (Qwen2.5-3B's head layout: 16 query heads of 128 over 2 KV heads; q/k/v biases; the upper two of
four layers windowed to 64 tokens): the default FlashInfer + CUDA-graph path against the torch backend, bf16 and
fp32 against transformers, and the window's fallback reported. See tests/support/family_gpu.py."""
from __future__ import annotations

import pytest

from tests.gpu.test_gpu_parity import NEEDS_FLASHINFER
from tests.support import family_gpu

pytestmark = pytest.mark.gpu

SHAPE = dict(vocab_size=49152, hidden_size=2048, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
             use_sliding_window=True, sliding_window=64, max_window_layers=2)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory, smollm_tokenizer):
    import transformers

    path = tmp_path_factory.mktemp("gpu-qwen2")
    ref32 = family_gpu.gentle_from_config(transformers.Qwen2Config(**SHAPE), path, smollm_tokenizer, seed=21)
    return str(path), ref32


@NEEDS_FLASHINFER
def test_default_path_equals_torch_backend_and_reports_window_fallback(qwen2):
    paths = family_gpu.check_default_path_against_torch_backend(qwen2[0])
    assert family_gpu.has_window_fallback(paths), paths


def test_bf16_error_like_transformers(qwen2):
    family_gpu.check_bf16_error_like_transformers(*qwen2)


def test_fp32_greedy_equals_transformers(qwen2):
    family_gpu.check_fp32_greedy_equals_transformers(*qwen2)


@NEEDS_FLASHINFER
def test_cascade_decode_like_plain_without_windows(tmp_path, smollm_tokenizer):
    """Qwen2.5's published configs turn the window off (use_sliding_window false): then cascade decode serves it."""
    import transformers

    config = transformers.Qwen2Config(**{**SHAPE, "use_sliding_window": False})
    family_gpu.gentle_from_config(config, tmp_path, smollm_tokenizer, seed=26)
    family_gpu.check_cascade_decode_like_plain(str(tmp_path))
