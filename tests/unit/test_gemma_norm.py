"""GemmaRMSNorm against transformers' Gemma2RMSNorm and Gemma3RMSNorm (the independent references), and its
exclusion from the kernel plans that compute Llama's rounding."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from braidinfer.layers import GemmaRMSNorm, KernelPlan, RMSNorm, describe_kernels, select_kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reference", ["gemma2", "gemma3"])
def test_matches_transformers_bit_for_bit(dtype, reference):
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    torch.manual_seed(0)
    ref = {"gemma2": Gemma2RMSNorm, "gemma3": Gemma3RMSNorm}[reference](48, eps=1e-6)
    ours = GemmaRMSNorm(48, eps=1e-6)
    with torch.no_grad():
        ref.weight.uniform_(-0.5, 3.0)
        ours.weight.copy_(ref.weight)
    ref, ours = ref.to(dtype), ours.to(dtype)
    x = (torch.randn(5, 3, 48) * 7).to(dtype)  # per-head use ([T, heads, head_dim]) as in Gemma 3's QK-norm
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


def test_differs_from_llama_rounding_in_bf16():
    # Why it is a layer of its own: Llama's norm with weight 1 + w rounds before the multiply.
    torch.manual_seed(1)
    gemma, llama = GemmaRMSNorm(64, 1e-6), RMSNorm(64, 1e-6)
    with torch.no_grad():
        gemma.weight.uniform_(0.5, 3.0)
        llama.weight.copy_(1 + gemma.weight)
    x = torch.randn(32, 64).bfloat16()
    assert not torch.equal(gemma.bfloat16()(x), llama.bfloat16()(x))


def test_kernel_plans_leave_it_on_torch():
    model = nn.Sequential(GemmaRMSNorm(8, 1e-6))
    select_kernels(model, KernelPlan(triton=True))
    assert not hasattr(model[0], "plan") and not hasattr(model[0], "feeds_gemv")
    assert any(line.startswith("gemma_rmsnorm") and "torch" in line for line in describe_kernels(model))
