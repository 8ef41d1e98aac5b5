"""Gemma 2 and Gemma 3 with every Triton kernel switched on compute what their PyTorch path computes.

The Gemma norms have no kernel (their float32 (1 + w) rounding is not Llama's), so they stay in PyTorch while the
projections take the GEMV kernels and, for Gemma 2, q and k the fused RoPE + KV-write kernel; Gemma 3's QK-norm keeps
its attention on the PyTorch path. float32 on the Triton interpreter (conftest.py), so only sum orders differ.
"""
from __future__ import annotations

import pytest

from braidinfer import LLM, SamplingParams
from braidinfer.layers import KernelPlan, select_kernels
from tests.conftest import build_tiny_model_from_config


def _config(family: str):
    import transformers

    shape = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=256,
                 attn_implementation="eager")
    if family == "gemma2":
        return transformers.Gemma2Config(**shape, attn_logit_softcapping=10.0, final_logit_softcapping=5.0)
    return transformers.Gemma3TextConfig(**shape, sliding_window_pattern=2)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_kernels_match_pytorch_path(family, tmp_path, smollm_tokenizer, device):
    build_tiny_model_from_config(_config(family), tmp_path, smollm_tokenizer, seed=13)
    kw = dict(device=device, dtype="float32", num_kv_pages=64, page_size=4, attention_backend="torch",
              fused_kernels=False, progress=False)
    prompt = list(range(10, 31))  # longer than the window
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True)
    with LLM(model=str(tmp_path), **kw) as plain:
        want = plain.generate(prompt, params)[0]
    with LLM(model=str(tmp_path), **kw) as fused:
        select_kernels(fused.engine.model, KernelPlan(triton=True, gemv=True))  # the engine chooses them on CUDA only
        paths = fused.engine.kernel_paths
        got = fused.generate(prompt, params)[0]
    assert any(line.startswith("gemma_rmsnorm") and "torch" in line for line in paths), paths
    attention = next(line for line in paths if line.startswith("attention ("))
    assert ("triton" in attention) == (family == "gemma2"), attention
    assert got.token_ids == want.token_ids
    for gl, wl in zip(got.logprobs, want.logprobs):
        assert gl.logprob == pytest.approx(wl.logprob, abs=1e-4)
        assert dict(gl.top).keys() == dict(wl.top).keys()
