"""The model with the Triton kernels of `braid_kernels/` computes what the PyTorch path computes, to bf16 rounding.

Steps of one row (batch-1 decode) run through the GEMV kernels of braid_kernels/gemv.py, the others through cuBLAS and
the elementwise kernels."""
from __future__ import annotations

import copy

import pytest
import torch

from braidinfer import LLM, SamplingParams
from tests.gpu.test_gpu_parity import (
    DEFAULT_PATH_TOL,
    MAX_BF16_ERROR,
    NEEDS_FLASHINFER,
    SHAPES,
    _errors,
    _prompts,
    gentle_model,
)
from tests.support.numerics import assert_error_like_reference, assert_mostly_identical, assert_same_greedy


def _assert_same_greedy(want, got) -> None:
    """Same greedy tokens and top logprobs as the PyTorch path's output, but for a parting at a near-tie."""
    assert_same_greedy(want.token_ids, [dict(x.top) for x in want.logprobs],
                       got.token_ids, [dict(x.top) for x in got.logprobs], DEFAULT_PATH_TOL)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", sorted(SHAPES))
def test_fused_kernels_are_as_accurate_as_the_pytorch_path(arch, tmp_path, smollm_tokenizer):
    """On a gentle model (see test_gpu_parity.py), against the fp32 model the bf16 error with the kernels is of the
    size of the PyTorch path's bf16 error (the kernels sum RMSNorm's squares in another order, which moves a logit by
    at most a bf16 step or so); against the PyTorch path itself, the logprobs agree within DEFAULT_PATH_TOL at every
    step with the same context, greedy paths part only at near-ties, and at most one of four does."""
    ref32 = gentle_model(arch, tmp_path, smollm_tokenizer, seed=5).to("cuda")
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    kw = dict(device="cuda", dtype="bfloat16", num_kv_pages=2048, attention_backend="torch", progress=False)
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True)
    prompts = _prompts(seed=3)[:4]
    with LLM(model=str(tmp_path), fused_kernels=False, **kw) as plain:
        want = plain.generate(prompts, params)
    with LLM(model=str(tmp_path), fused_kernels=True, **kw) as fused:
        got = fused.generate(prompts, params)
    for g, w, prompt in zip(got, want, prompts):
        fused_err, _ = _errors(g, prompt, ref32, ref16)
        plain_err, hf_err = _errors(w, prompt, ref32, ref16)
        print(f"{arch}: bf16 error vs fp32, fused {fused_err:.3f}, pytorch path {plain_err:.3f}, transformers {hf_err:.3f}")
        assert_error_like_reference(fused_err, max(plain_err, hf_err), MAX_BF16_ERROR)
        _assert_same_greedy(w, g)
    assert_mostly_identical([g.token_ids for g in got], [w.token_ids for w in want], max_differing=1)


@NEEDS_FLASHINFER
@pytest.mark.parametrize("arch", sorted(SHAPES))
def test_batch_one_decode_through_gemv_graphs(arch, tmp_path, smollm_tokenizer, monkeypatch):
    """One request at a time on the default engine (FlashInfer, CUDA graphs): its decode steps replay graphs of
    the GEMV path, are as accurate against the fp32 model as the PyTorch path's, and give its logprobs within
    DEFAULT_PATH_TOL wherever the context is the same (a gentle model: see test_gpu_parity.py)."""
    import braid_kernels as kernels

    calls = []
    original = kernels.silu_and_mul_gemv
    monkeypatch.setattr(kernels, "silu_and_mul_gemv", lambda *a, **k: calls.append(1) or original(*a, **k))
    ref32 = gentle_model(arch, tmp_path, smollm_tokenizer, seed=6).to("cuda")
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    kw = dict(device="cuda", dtype="bfloat16", num_kv_pages=2048, max_num_seqs=8, progress=False)
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=5, ignore_eos=True)
    prompts = _prompts(seed=4, lengths=(5, 40, 300))
    with LLM(model=str(tmp_path), fused_kernels=False, **kw) as plain:
        want = [plain.generate(p, params)[0] for p in prompts]
    with LLM(model=str(tmp_path), fused_kernels=True, **kw) as fused:
        assert calls, "the decode graphs were not captured through the GEMV path"
        got = [fused.generate(p, params)[0] for p in prompts]
        assert fused.engine.runner.graphs.num_replays >= len(prompts) * (params.max_tokens - 1)
    for g, w, prompt in zip(got, want, prompts):
        fused_err, _ = _errors(g, prompt, ref32, ref16)
        plain_err, hf_err = _errors(w, prompt, ref32, ref16)
        print(f"{arch} batch 1: bf16 error vs fp32, GEMV path {fused_err:.3f}, pytorch path {plain_err:.3f}, "
              f"transformers {hf_err:.3f}")
        assert_error_like_reference(fused_err, max(plain_err, hf_err), MAX_BF16_ERROR)
        _assert_same_greedy(w, g)
