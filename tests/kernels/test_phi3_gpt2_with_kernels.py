"""Phi-3 (LongRoPE tables with the attention factor through the fused QK-norm + RoPE + KV-write kernel; partial
rotary, which stays in PyTorch) and GPT-2 (biased projections through the GEMV kernel, no rotary) with every Triton
kernel switched on compute what their PyTorch path computes (float32, the interpreter on the CPU)."""
from __future__ import annotations

import pytest

from braidinfer import LLM, SamplingParams
from braidinfer.layers import KernelPlan, select_kernels
from tests.conftest import build_tiny_model_from_config
from tests.integration.test_parity_gpt2 import _config as gpt2_config
from tests.integration.test_parity_phi3 import _config as phi3_config

CONFIGS = {
    "phi3": lambda: phi3_config(16, 1.0, 12, False, seed=9),  # sliding window 12, the long set served (256 > 32)
    "phi4-mini": lambda: phi3_config(16, 0.75, None, True, seed=10),
    "gpt2": gpt2_config,
}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_kernels_match_pytorch_path(family, tmp_path, smollm_tokenizer, device):
    build_tiny_model_from_config(CONFIGS[family](), tmp_path, smollm_tokenizer, seed=11)
    kw = dict(device=device, dtype="float32", num_kv_pages=64, page_size=4, attention_backend="torch",
              fused_kernels=False, progress=False)
    prompts = [list(range(10, 31)), list(range(40, 52))]
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True)
    with LLM(model=str(tmp_path), **kw) as plain:
        want = [plain.generate(p, params)[0] for p in prompts]
    with LLM(model=str(tmp_path), **kw) as fused:
        select_kernels(fused.engine.model, KernelPlan(triton=True, gemv=True))  # the engine chooses them on CUDA only
        paths = "\n".join(fused.engine.kernel_paths)
        got = [fused.generate(p, params)[0] for p in prompts]
    assert ("qk_norm_rope_write_kv" in paths) == (family == "phi3")  # full rotary only
    assert "triton gemv" in paths
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        for gl, wl in zip(g.logprobs, w.logprobs):
            got_top, want_top = dict(gl.top), dict(wl.top)
            assert got_top.keys() == want_top.keys()
            assert all(got_top[t] == pytest.approx(want_top[t], abs=1e-4) for t in want_top)
