"""Qwen2 (q/k/v biases, a windowed layer) and ERNIE-4.5 (biases on every projection, float32 rotation) with every
Triton kernel switched on compute what their PyTorch path computes (interpreted on the CPU, as
test_model_with_kernels.py). Mistral adds nothing here: its window is the attention backend's, as Qwen2's is.
ERNIE's float32 rotation is not what the fused QK-norm + RoPE kernel rounds like, so its attention stays in torch."""
from __future__ import annotations

import pytest

from braidinfer import LLM, SamplingParams
from braidinfer.layers import KernelPlan, describe_kernels, select_kernels
from tests.conftest import build_tiny_model_from_config
from tests.support.tiny_checkpoints import randomize_biases

SHAPE = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def _config(family: str):
    import transformers

    if family == "qwen2":
        return transformers.Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    return transformers.Ernie4_5Config(**SHAPE, head_dim=32, use_bias=True)


@pytest.mark.parametrize("family", ["qwen2", "ernie4_5"])
def test_family_with_kernels_matches_pytorch_path(family, tmp_path, smollm_tokenizer, device):
    ref = build_tiny_model_from_config(_config(family), tmp_path, smollm_tokenizer, seed=13)
    randomize_biases(ref, tmp_path, seed=13)
    kw = dict(device=device, dtype="float32", num_kv_pages=64, page_size=4, attention_backend="torch",
              fused_kernels=False, progress=False)
    prompts = [list(range(10, 31)), [5, 6, 7]]  # longer than the window of 8; a 3-row prefill for the GEMVs
    params = SamplingParams(temperature=0, max_tokens=3, logprobs=3, ignore_eos=True)
    with LLM(model=str(tmp_path), **kw) as plain:
        want = [plain.generate(p, params)[0] for p in prompts]
    with LLM(model=str(tmp_path), **kw) as fused:
        select_kernels(fused.engine.model, KernelPlan(triton=True, gemv=True))
        paths = describe_kernels(fused.engine.model)
        got = [fused.generate(p, params)[0] for p in prompts]
    fused_rope = any("qk_norm_rope_write_kv" in p for p in paths)
    assert fused_rope == (family != "ernie4_5"), paths
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        for gl, wl in zip(g.logprobs, w.logprobs):
            got_top, want_top = dict(gl.top), dict(wl.top)
            assert got_top.keys() == want_top.keys()
            assert all(got_top[t] == pytest.approx(want_top[t], abs=1e-4) for t in want_top)
