"""ERNIE-4.5 on CUDA (ERNIE-4.5-0.3B's head layout: 16 query heads of 128 over 2 KV heads, tied embeddings): the
default FlashInfer + CUDA-graph path against the torch backend, bf16 (its rotation in float32, as transformers does)
and fp32 against transformers. Its attention keeps RoPE in torch: the fused Triton kernel rotates in the model's
dtype. See tests/support/family_gpu.py."""
from __future__ import annotations

import pytest

from tests.gpu.test_gpu_parity import NEEDS_FLASHINFER
from tests.support import family_gpu

pytestmark = pytest.mark.gpu

SHAPE = dict(vocab_size=49152, hidden_size=1024, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=2, head_dim=128, max_position_embeddings=2048, tie_word_embeddings=True,
             use_bias=False)


@pytest.fixture(scope="module")
def ernie(tmp_path_factory, smollm_tokenizer):
    import transformers

    path = tmp_path_factory.mktemp("gpu-ernie4_5")
    ref32 = family_gpu.gentle_from_config(transformers.Ernie4_5Config(**SHAPE), path, smollm_tokenizer, seed=23)
    return str(path), ref32


@NEEDS_FLASHINFER
def test_default_path_equals_torch_backend_with_rope_in_torch(ernie):
    paths = family_gpu.check_default_path_against_torch_backend(ernie[0])
    assert any("rope in torch" in p for p in paths), paths
    assert not family_gpu.has_window_fallback(paths), paths


@NEEDS_FLASHINFER
def test_cascade_decode_like_plain(ernie):
    family_gpu.check_cascade_decode_like_plain(ernie[0])


def test_bf16_error_like_transformers(ernie):
    family_gpu.check_bf16_error_like_transformers(*ernie)


def test_fp32_greedy_equals_transformers(ernie):
    family_gpu.check_fp32_greedy_equals_transformers(*ernie)
