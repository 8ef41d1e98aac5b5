"""Gemma 2 on the default GPU path in bf16 (FlashInfer with per-layer sliding windows and logit soft-capping, CUDA
graphs) against transformers, and the fallbacks kernel_paths reports for it."""
from __future__ import annotations

import copy

import pytest
import torch

from braidinfer import LLM
from braidinfer.attention.flashinfer_backend import FlashInferAttention
from tests.gpu.test_gpu_parity import NEEDS_FLASHINFER
from tests.support.family_gpu import check_greedy, check_logprobs, gentle_from_config, prompts

pytestmark = [pytest.mark.gpu, NEEDS_FLASHINFER]

WINDOW = 64


def gemma2_config():
    from transformers import Gemma2Config

    # 4 layers of head_dim 128 (FlashInfer's cached kernels); a window shorter than most prompts; caps that bend.
    # The final cap is Gemma 2's own 30: at 5 the top logits of this model all sit within 0.01 of the cap, so bf16
    # rounding alone picks the greedy token (transformers' bf16 model agreed with its float32 one on 2 of 16 first
    # tokens); at 30 the top logit (~27, ~43 before the cap) leads by ~9.
    return Gemma2Config(vocab_size=49152, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=128, query_pre_attn_scalar=128,
                        sliding_window=WINDOW, attn_logit_softcapping=5.0, final_logit_softcapping=30.0,
                        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                        attn_implementation="eager")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, smollm_tokenizer):
    """(directory, float32 transformers model on CUDA) of the gentle random Gemma 2."""
    path = tmp_path_factory.mktemp("gpu-gemma2")
    return path, gentle_from_config(gemma2_config(), path, smollm_tokenizer, seed=21).to("cuda")


@pytest.fixture(scope="module")
def models(checkpoint):
    path, ref32 = checkpoint
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    llm = LLM(model=str(path), device="cuda", dtype="bfloat16", num_kv_pages=4096, progress=False)
    yield llm, ref32, ref16
    llm.close()


def test_default_path_is_flashinfer_with_graphs(models):
    llm, _, _ = models
    runner = llm.engine.runner
    assert isinstance(runner.attention, FlashInferAttention) and runner.graphs is not None


def test_logprobs_within_bf16_tolerance(models):
    llm, ref32, ref16 = models
    check_logprobs(llm, ref32, ref16, prompts(0, (7, 70, 129, 300)))


def test_chunked_prefill_with_windows(checkpoint, models):
    """A prompt prefilled in chunks: each continuation chunk attends with fewer query rows than KV rows, through the
    windowed and the global layers' wrappers (FlashInfer's window_left with qo_len < kv_len)."""
    (path, _), (_, ref32, ref16) = checkpoint, models
    with LLM(model=str(path), device="cuda", dtype="bfloat16", num_kv_pages=1024, max_num_batched_tokens=128,
             progress=False) as chunked:
        check_logprobs(chunked, ref32, ref16, prompts(3, (300, 700)))


def test_greedy_tokens_agree_like_transformers_bf16(models):
    llm, ref32, ref16 = models
    check_greedy(llm, ref32, ref16, prompts(1, [5 + 37 * i for i in range(16)]))


def test_kernel_paths_report_the_fallbacks(models):
    llm, _, _ = models
    lines = llm.engine.kernel_paths
    text = "\n".join(lines)
    assert any(line.startswith("gemma_rmsnorm") for line in lines), text
    fallbacks = [line for line in lines if line.startswith("fallback:")]
    assert fallbacks, text
    assert any("window" in line and "soft-cap" in line for line in fallbacks), text
