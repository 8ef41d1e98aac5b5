"""Gemma 3 (text) on the default GPU path in bf16 (FlashInfer with sliding windows on local layers, CUDA graphs,
the QK-norm in PyTorch) against transformers, and the fallbacks kernel_paths reports for it."""
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


def gemma3_config():
    from transformers import Gemma3TextConfig

    # Gemma-3-1B's heads (4 q heads, 1 kv head) at head_dim 128 and 4 layers, pattern 2 so both kinds repeat.
    return Gemma3TextConfig(vocab_size=49152, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=128, query_pre_attn_scalar=128,
                            sliding_window=WINDOW, sliding_window_pattern=2, rope_theta=1_000_000.0,
                            rope_local_base_freq=10_000.0, max_position_embeddings=2048, bos_token_id=1,
                            eos_token_id=2, pad_token_id=0, attn_implementation="eager")


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm_tokenizer):
    path = tmp_path_factory.mktemp("gpu-gemma3")
    ref32 = gentle_from_config(gemma3_config(), path, smollm_tokenizer, seed=31).to("cuda")
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


def test_greedy_tokens_agree_like_transformers_bf16(models):
    llm, ref32, ref16 = models
    check_greedy(llm, ref32, ref16, prompts(1, [5 + 37 * i for i in range(16)]))


def test_kernel_paths_report_the_fallbacks(models):
    llm, _, _ = models
    lines = llm.engine.kernel_paths
    text = "\n".join(lines)
    attention = [line for line in lines if line.startswith("attention")]
    assert any("qk-norm" in line and "torch" in line for line in attention), text  # not the fused Triton kernel
    assert any(line.startswith("fallback:") and "window" in line for line in lines), text
