"""Phi-3 family on CUDA: the default GPU path (FlashInfer, CUDA graphs, Triton kernels) against the torch backend run
eagerly in bf16 on the same weights, fp32 greedy against transformers, and the paths kernel_paths() reports.

Layouts: Phi-4-mini's head (head_dim 128, partial rotary 0.75) and Phi-3-mini's (head_dim 96, sliding window).
FlashInfer has kernels for head_dim 64 / 128 / 256 (SUPPORTED_HEAD_DIMS), so head_dim 96 runs on FlashInfer with its
heads zero-padded to 128 in the KV cache (cache_head_dim), with CUDA graphs, and kernel_paths() says so. LongRoPE with original_max_position_embeddings 64 and a 4096-token context:
the long factor set is served, and the prompts are longer than 64 so transformers uses the long set too."""
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
LAYOUTS = {
    "phi4-mini": dict(head_dim=128, heads=8, kv_heads=2, partial=0.75, sliding_window=None, tie=True),
    "phi3-mini": dict(head_dim=96, heads=8, kv_heads=8, partial=1.0, sliding_window=100, tie=False),
}


def gentle_phi3(layout: str, path, tokenizer, seed: int):
    """A random Phi-3 of `layout` (4 layers, LongRoPE with factors in [1, 4]) with weights at std 0.02 and norm
    weights in [0.5, 1.5] (see test_gpu_parity.py: bf16 rounding stays well below a logprob's spread)."""
    import transformers

    shape = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    half = int(shape["head_dim"] * shape["partial"]) // 2
    factors = {k: (1 + 3 * torch.rand(half, generator=g)).tolist() for k in ("short_factor", "long_factor")}
    config = transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=shape["heads"] * shape["head_dim"], intermediate_size=2048,
        num_hidden_layers=4, num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=4096, original_max_position_embeddings=64, partial_rotary_factor=shape["partial"],
        sliding_window=shape["sliding_window"], rope_scaling={"type": "longrope", **factors},
        tie_word_embeddings=shape["tie"], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = build_tiny_model_from_config(config, path, tokenizer, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif p.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name:
                p.normal_(0, 0.02)
    model.save_pretrained(path)
    return model


def _prompts(seed, lengths=(65, 100, 129, 200, 300)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fp32_greedy_equals_transformers(layout, tmp_path, smollm_tokenizer):
    ref = gentle_phi3(layout, tmp_path, smollm_tokenizer, seed=21).to("cuda")
    prompts = _prompts(seed=1)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    with LLM(model=str(tmp_path), device="cuda", dtype="float32", num_kv_pages=2048, progress=False) as llm:
        ours = [o.token_ids for o in llm.generate(prompts, params)]
    same = sum(got == _greedy(ref, p) for p, got in zip(prompts, ours))
    assert same >= len(prompts) - 1, f"only {same}/{len(prompts)} fp32 greedy continuations identical"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_default_gpu_path_equals_torch_backend_eager(layout, tmp_path, smollm_tokenizer):
    gentle_phi3(layout, tmp_path, smollm_tokenizer, seed=22)
    prompts = _prompts(seed=2)
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=5, ignore_eos=True)
    kw = dict(device="cuda", num_kv_pages=2048, progress=False)
    with LLM(model=str(tmp_path), dtype="bfloat16", attention_backend="torch", enforce_eager=True,
             fused_kernels=False, **kw) as reference:
        want = reference.generate(prompts, params)
    with LLM(model=str(tmp_path), **kw) as default:
        paths = default.engine.kernel_paths
        print("\n".join(paths))
        got = default.generate(prompts, params)
    for g, w in zip(got, want):
        assert_same_greedy(w.token_ids, [dict(x.top) for x in w.logprobs],
                           g.token_ids, [dict(x.top) for x in g.logprobs], DEFAULT_PATH_TOL)


@NEEDS_FLASHINFER
def test_head_dim_96_runs_on_flashinfer_with_padded_heads(tmp_path, smollm_tokenizer):
    """The padded pool and its report; test_default_gpu_path_equals_torch_backend_eager[phi3-mini] compares its
    tokens and logprobs with the unpadded torch backend."""
    gentle_phi3("phi3-mini", tmp_path, smollm_tokenizer, seed=23)
    with LLM(model=str(tmp_path), device="cuda", num_kv_pages=256, progress=False) as llm:
        runner, paths = llm.engine.runner, llm.engine.kernel_paths
        assert isinstance(runner.attention, FlashInferAttention) and runner.graphs is not None
        assert runner.kv_cache.shape[-1] == 128
        assert any(p.startswith("fallback:") and "zero-padded to 128" in p for p in paths), paths
        llm.generate(_prompts(seed=3)[:2], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        assert runner.graphs.num_replays > 0
        assert runner.kv_cache[..., 96:].abs().max().item() == 0


@NEEDS_FLASHINFER
def test_phi4_mini_layout_uses_flashinfer_and_graphs(tmp_path, smollm_tokenizer):
    gentle_phi3("phi4-mini", tmp_path, smollm_tokenizer, seed=24)
    with LLM(model=str(tmp_path), device="cuda", num_kv_pages=256, progress=False) as llm:
        runner = llm.engine.runner
        assert isinstance(runner.attention, FlashInferAttention) and runner.graphs is not None
        # partial rotary: the rotation stays in PyTorch, not in the fused qk_norm_rope_write_kv kernel
        assert any("rope in torch" in p for p in llm.engine.kernel_paths), llm.engine.kernel_paths
        llm.generate(_prompts(seed=3)[:2], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        assert runner.graphs.num_replays > 0


@NEEDS_FLASHINFER
def test_sliding_window_is_reported_as_a_fallback(tmp_path, smollm_tokenizer):
    """A Phi-3 layout FlashInfer serves (head_dim 128) with a sliding window: the Triton decode kernel computes only
    plain attention, so CUDA-graph decodes attend with FlashInfer and kernel_paths() says why."""
    import transformers

    config = transformers.Phi3Config(vocab_size=VOCAB, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                                     sliding_window=100, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    build_tiny_model_from_config(config, tmp_path, smollm_tokenizer, seed=25)
    with LLM(model=str(tmp_path), device="cuda", num_kv_pages=256, progress=False) as llm:
        fallbacks = [p for p in llm.engine.kernel_paths if p.startswith("fallback:")]
        assert any("sliding windows [100]" in p for p in fallbacks), fallbacks


@NEEDS_FLASHINFER
def test_phi4_mini_layout_cascade_decode_like_plain(tmp_path, smollm_tokenizer):
    gentle_phi3("phi4-mini", tmp_path, smollm_tokenizer, seed=28)
    family_gpu.check_cascade_decode_like_plain(str(tmp_path))
