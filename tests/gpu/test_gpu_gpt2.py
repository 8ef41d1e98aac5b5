"""GPT-2 on CUDA: the default GPU path (FlashInfer with CUDA graphs, GEMV kernels for the biased projections)
against the torch backend run eagerly in bf16 on the same weights, and fp32 greedy against transformers. GPT-2's
head (head_dim 64, plain attention) takes every fast path: kernel_paths() reports no fallback."""
from __future__ import annotations

import pytest
import torch

from braidinfer import LLM, SamplingParams
from braidinfer.attention.flashinfer_backend import FlashInferAttention
from tests.conftest import build_tiny_model_from_config
from tests.gpu.test_gpu_parity import DEFAULT_PATH_TOL, NEEDS_FLASHINFER, _greedy
from tests.support import family_gpu
from tests.support.numerics import assert_same_greedy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

VOCAB = 49152


def gentle_gpt2(path, tokenizer, seed: int):
    """A random GPT-2 of GPT-2 small's head layout (12 heads of 64, 4 layers) with weights at std 0.02 and
    LayerNorm weights in [0.5, 1.5] (see test_gpu_parity.py)."""
    import transformers

    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=768, n_layer=4, n_head=12, n_positions=1024,
                                     bos_token_id=1, eos_token_id=2)
    model = build_tiny_model_from_config(config, path, tokenizer, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.uniform_(0.5, 1.5)
            elif p.dim() == 2 and "wte" not in name and "wpe" not in name:
                p.normal_(0, 0.02)
    model.save_pretrained(path)
    return model


def _prompts(seed, lengths=(7, 31, 64, 129, 300)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def test_fp32_greedy_equals_transformers(tmp_path, smollm_tokenizer):
    ref = gentle_gpt2(tmp_path, smollm_tokenizer, seed=31).to("cuda")
    prompts = _prompts(seed=1)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    with LLM(model=str(tmp_path), device="cuda", dtype="float32", num_kv_pages=2048, progress=False) as llm:
        ours = [o.token_ids for o in llm.generate(prompts, params)]
    same = sum(got == _greedy(ref, p) for p, got in zip(prompts, ours))
    assert same >= len(prompts) - 1, f"only {same}/{len(prompts)} fp32 greedy continuations identical"


@NEEDS_FLASHINFER
def test_default_gpu_path_equals_torch_backend_eager(tmp_path, smollm_tokenizer):
    gentle_gpt2(tmp_path, smollm_tokenizer, seed=32)
    prompts = _prompts(seed=2)
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=5, ignore_eos=True)
    kw = dict(device="cuda", num_kv_pages=2048, progress=False)
    with LLM(model=str(tmp_path), dtype="bfloat16", attention_backend="torch", enforce_eager=True,
             fused_kernels=False, **kw) as reference:
        want = reference.generate(prompts, params)
    with LLM(model=str(tmp_path), **kw) as default:
        runner = default.engine.runner
        assert isinstance(runner.attention, FlashInferAttention) and runner.graphs is not None
        paths = default.engine.kernel_paths
        print("\n".join(paths))
        assert not [p for p in paths if p.startswith("fallback:")], paths
        alone = [default.generate(p, params)[0] for p in prompts]
        together = default.generate(prompts, params)
        assert runner.graphs.num_replays > 0
    for got in (alone, together):
        for g, w in zip(got, want):
            assert_same_greedy(w.token_ids, [dict(x.top) for x in w.logprobs],
                               g.token_ids, [dict(x.top) for x in g.logprobs], DEFAULT_PATH_TOL)


@NEEDS_FLASHINFER
def test_cascade_decode_like_plain(tmp_path, smollm_tokenizer):
    gentle_gpt2(tmp_path, smollm_tokenizer, seed=33)
    family_gpu.check_cascade_decode_like_plain(str(tmp_path))
