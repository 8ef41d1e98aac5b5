"""The model with every Triton kernel switched on computes what its PyTorch path computes.

On the CPU the kernels run in Triton's interpreter (see conftest.py), so this checks the wiring in CI: which
tensors reach the kernels, the fused QK-norm + RoPE + KV-write path handing attention over to `attend`, the
residual stream through fused add+RMSNorm, and steps of a few rows through the GEMV kernels with those steps in
their prologues. float32, so the only differences are the order of RMSNorm's sums and of the products' sums.
"""
from __future__ import annotations

import collections

import pytest

from braidinfer import LLM, SamplingParams
from braidinfer.layers import KernelPlan, select_kernels
from tests.conftest import build_tiny_model


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fused_model_matches_pytorch_path(arch, tmp_path, smollm_tokenizer, device):
    build_tiny_model(arch, tmp_path, smollm_tokenizer, seed=11, num_hidden_layers=2)
    kw = dict(device=device, dtype="float32", num_kv_pages=64, page_size=4, attention_backend="torch",
              fused_kernels=False, progress=False)
    # Two prompts sharing a page-aligned prefix: the second reuses cached KV written by the fused kernel.
    prompts = [list(range(10, 31)), list(range(10, 22)) + [7, 8, 9, 40, 41]]
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True)
    with LLM(model=str(tmp_path), **kw) as plain:
        want = [plain.generate(p, params)[0] for p in prompts]
    with LLM(model=str(tmp_path), **kw) as fused:
        select_kernels(fused.engine.model, KernelPlan(triton=True, gemv=True))  # the engine chooses them on CUDA only
        got = [fused.generate(p, params)[0] for p in prompts]
        assert fused.cache_stats()["tokens_served_from_cache"] > 0
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        for gl, wl in zip(g.logprobs, w.logprobs):
            assert gl.logprob == pytest.approx(wl.logprob, abs=1e-4)
            got_top, want_top = dict(gl.top), dict(wl.top)
            assert got_top.keys() == want_top.keys()
            assert all(got_top[t] == pytest.approx(want_top[t], abs=1e-4) for t in want_top)


@pytest.mark.parametrize("gemv", [True, False])
def test_fused_path_is_really_taken(tmp_path, smollm_tokenizer, device, monkeypatch, gemv):
    """Guards the test above against comparing the PyTorch path with itself. Steps of one row (the decode steps,
    not the prefills) go through the GEMV kernels unless they are switched off."""
    import braid_kernels as kernels

    calls = collections.Counter()
    for name in ["qk_norm_rope_write_kv", "fused_add_rms_norm", "rms_norm_gemv", "fused_add_rms_norm_gemv", "gemv",
                 "silu_and_mul_gemv"]:
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _name=name, _kernel=original, **k: calls.update([_name]) or
                            _kernel(*a, **k))
    build_tiny_model("qwen3", tmp_path, smollm_tokenizer, seed=1, num_hidden_layers=2)
    with LLM(model=str(tmp_path), device=device, dtype="float32", num_kv_pages=64, attention_backend="torch",
             progress=False) as llm:
        select_kernels(llm.engine.model, KernelPlan(triton=True, gemv=gemv))
        llm.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=2))  # a 3-token prefill, a decode step
    layers = 2
    fused_step = collections.Counter(fused_add_rms_norm=2 * layers)  # layers' norms after the first, final norm
    gemv_step = collections.Counter(rms_norm_gemv=1, fused_add_rms_norm_gemv=2 * layers - 1, gemv=layers,
                                    silu_and_mul_gemv=layers, fused_add_rms_norm=1)
    want = collections.Counter(qk_norm_rope_write_kv=2 * layers) + fused_step + (gemv_step if gemv else fused_step)
    assert calls == want
