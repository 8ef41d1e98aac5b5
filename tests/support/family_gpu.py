"""The GPU checks every added family runs (tests/gpu/test_gpu_<family>.py), on a gentle tiny model in the style of
tests/gpu/test_gpu_parity.py: inner weights at std 0.02, norms in [0.5, 1.5], small random biases, so that bf16
rounding alone does not flip which key wins and the tolerances measured there apply.

- the default CUDA path (FlashInfer, CUDA-graph decode, Triton kernels) against the torch backend run eagerly, both
  bf16 on the same weights, step by step (DEFAULT_PATH_TOL);
- the bf16 logprob error against transformers' float32 model of the size of transformers' own bf16 error;
- fp32 on CUDA: greedy continuations equal transformers' float32 ones;
- kernel_paths() names the fallback a windowed model takes (FlashInfer decode instead of Triton's, no cascade);
- cascade decode (questions sharing a pinned chunk) against plain decode, for the families that take it;
- for families whose default path the torch backend cannot mirror step by step (Gemma 2 / 3: window and soft-cap
  wrappers), the bf16 engine against transformers' float32 and bf16 runs directly (check_logprobs, check_greedy).
"""
from __future__ import annotations

import copy

import torch

from braidinfer import LLM, SamplingParams
from braidinfer.attention.flashinfer_backend import FlashInferAttention
from tests.conftest import build_tiny_model_from_config
from tests.gpu.test_gpu_parity import DEFAULT_PATH_TOL, MAX_BF16_ERROR, _errors, _greedy
from tests.support.numerics import assert_error_like_reference, assert_greedy_agreement, assert_same_greedy

MIN_FIRST_AGREEMENT = 0.5
"""Fraction of first greedy tokens that must equal the float32 model's (tests/gpu/test_gpu_parity.py)."""
PROMPT_LENGTHS = (7, 31, 64, 129, 200, 300)
"""Longer than the GPU tests' windows (64), prefilled across several pages."""


def gentle_from_config(config, path, tokenizer, seed: int):
    """build_tiny_model_from_config's model with its inner 2-D weights scaled to std 0.02, its norm weights mapped
    into [0.5, 1.5] and its biases drawn from N(0, 0.02), saved again to `path`; returns the float32 model."""
    model = build_tiny_model_from_config(config, path, tokenizer, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.sub_(0.5).mul_(1.0 / 3.5).add_(0.5)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif p.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name:
                p.mul_(0.2)
    model.save_pretrained(path)
    return model


def prompts(seed: int, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (n,), generator=g).tolist() for n in lengths]


def check_default_path_against_torch_backend(path: str) -> list[str]:
    """The default CUDA engine against the torch backend eagerly, both bf16, alone and batched; returns the default
    engine's kernel_paths()."""
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=5, ignore_eos=True)
    ps = prompts(seed=6)
    kw = dict(device="cuda", num_kv_pages=4096, progress=False)
    with LLM(model=path, dtype="bfloat16", attention_backend="torch", enforce_eager=True, fused_kernels=False,
             **kw) as reference:
        want = reference.generate(ps, params)
    with LLM(model=path, **kw) as default:
        runner = default.engine.runner
        assert isinstance(runner.attention, FlashInferAttention) and runner.graphs is not None
        alone = [default.generate(p, params)[0] for p in ps]
        together = default.generate(ps, params)
        assert runner.graphs.num_replays > 0
        paths = default.engine.kernel_paths
    for got in (alone, together):
        for g, w in zip(got, want):
            assert_same_greedy(w.token_ids, [dict(x.top) for x in w.logprobs],
                               g.token_ids, [dict(x.top) for x in g.logprobs], DEFAULT_PATH_TOL)
    return paths


def check_cascade_decode_like_plain(path: str) -> None:
    """Twelve questions on one pinned 300-token chunk, bf16, through cascade-decode graphs (threshold 0: every
    decode step shares the chunk's pages) and through the plain graphs: the same greedy tokens and logprobs
    (tests/gpu/test_cuda_graphs.py::assert_cascade_like_plain)."""
    from tests.gpu.test_cuda_graphs import assert_cascade_like_plain

    prefix = prompts(seed=7, lengths=[300])[0]
    questions = prompts(seed=8, lengths=[5 + 3 * i for i in range(12)])
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=5, ignore_eos=True)
    outputs = []
    for extra in (dict(cascade_min_saved_tokens=0), dict(cascade_decode=False)):
        with LLM(model=path, device="cuda", dtype="bfloat16", num_kv_pages=1024, progress=False, **extra) as llm:
            outputs.append(llm.generate(questions, params, chunks=llm.chunks.add(prefix)))
            assert not [p for p in llm.engine.kernel_paths if p.startswith("fallback: cascade")]
            assert (llm.engine.runner.graphs.num_cascade_replays > 0) == ("cascade_decode" not in extra)
    assert_cascade_like_plain(*outputs)


def check_bf16_error_like_transformers(path: str, ref32) -> None:
    """Our bf16 logprobs off transformers' float32 model by no more than transformers' own bf16 model is."""
    ref32 = ref32.to("cuda")
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    with LLM(model=path, device="cuda", dtype="bfloat16", num_kv_pages=4096, progress=False) as llm:
        check_logprobs(llm, ref32, ref16, prompts(seed=0)[:4])


def check_fp32_greedy_equals_transformers(path: str, ref32) -> None:
    """In float32 on CUDA, greedy continuations equal transformers' (one of six may part at a rounding tie)."""
    ref32 = ref32.to("cuda")
    ps = prompts(seed=2)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    with LLM(model=path, device="cuda", dtype="float32", num_kv_pages=4096, progress=False) as llm:
        ours = [o.token_ids for o in llm.generate(ps, params)]
    same = sum(got == _greedy(ref32, p, 32) for p, got in zip(ps, ours))
    assert same >= len(ps) - 1, f"only {same}/{len(ps)} fp32 greedy continuations identical"


def has_window_fallback(paths: list[str]) -> bool:
    """Whether kernel_paths() reports that the sliding windows keep decode off the Triton kernel."""
    return any(p.startswith("fallback:") and "sliding windows" in p for p in paths)


def check_logprobs(llm, ref32, ref16, prompts) -> None:
    """Our bf16 top-5 logprobs are off the float32 model's by about transformers' own bf16 error, at most
    MAX_BF16_ERROR."""
    for prompt in prompts:
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True))[0]
        ours, hf = _errors(out, prompt, ref32, ref16)
        print(f"prompt {len(prompt)}: bf16 error vs fp32 {ours:.3f}, transformers' {hf:.3f}")
        assert_error_like_reference(ours, hf, MAX_BF16_ERROR)


def check_greedy(llm, ref32, ref16, prompts) -> None:
    """Batched bf16 greedy continuations agree with the float32 model about as long as transformers' bf16 ones."""
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ours = [o.token_ids for o in llm.generate(prompts, params)]
    exact = [_greedy(ref32, p) for p in prompts]
    hf16 = [_greedy(ref16, p) for p in prompts]
    assert_greedy_agreement(ours, hf16, exact, MIN_FIRST_AGREEMENT)
