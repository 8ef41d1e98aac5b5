"""braid_kernels/cpu_norm: RMSNorm (plain and after the residual add) and SiLU-and-mul in C against their plain
PyTorch references (and transformers' RMSNorm)."""
from __future__ import annotations

import pytest
import torch

from braid_kernels import cpu_library, cpu_norm

pytestmark = pytest.mark.skipif(not cpu_library.available(), reason=f"{cpu_library.unavailable_reason()}")


@pytest.mark.parametrize("dim", [7, 64, 100, 576])
def test_rms_norm_matches_transformers(dim):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(dim)
    ref = LlamaRMSNorm(dim, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(dim, generator=gen))
        for scale in (1e-3, 1.0, 30.0):
            x, residual = torch.randn(5, dim, generator=gen) * scale, torch.randn(5, dim, generator=gen)
            torch.testing.assert_close(cpu_norm.rms_norm(x, ref.weight, 1e-5), ref(x), rtol=2e-6, atol=1e-6 * scale)
            y, h = cpu_norm.rms_norm(x, ref.weight, 1e-5, residual)
            assert torch.equal(h, x + residual)
            torch.testing.assert_close(y, ref(x + residual), rtol=2e-6, atol=1e-6)
            ry, _ = cpu_norm.rms_norm_ref(x, ref.weight, 1e-5, residual)
            torch.testing.assert_close(y, ry, rtol=2e-6, atol=1e-6)


def test_silu_and_mul_matches_reference():
    gen = torch.Generator().manual_seed(0)
    for d in (5, 16, 1536):
        x = torch.randn(3, 2 * d, generator=gen) * 8  # exp over a wide range, both signs
        x[0, 0], x[0, 1] = -100.0, 100.0  # exp under- and overflow, clamped
        torch.testing.assert_close(cpu_norm.silu_and_mul(x), cpu_norm.silu_and_mul_ref(x), rtol=4e-7, atol=1e-30)


def test_refuses_bad_arguments():
    w = torch.ones(8)
    with pytest.raises(ValueError, match="float32"):
        cpu_norm.rms_norm(torch.ones(2, 8, dtype=torch.float64), w, 1e-6)
    with pytest.raises(ValueError, match=r"\[rows, 8\]"):
        cpu_norm.rms_norm(torch.ones(2, 9), w, 1e-6)
    with pytest.raises(ValueError, match="residual"):
        cpu_norm.rms_norm(torch.ones(2, 8), w, 1e-6, residual=torch.ones(3, 8))
    with pytest.raises(ValueError, match="2 \\* d"):
        cpu_norm.silu_and_mul(torch.ones(2, 7))


def test_outputs_are_float32_whatever_torch_defaults_to():
    """The kernels write float32: their outputs are allocated so, not in torch's default dtype (a float16 default
    would otherwise get half the bytes the kernel writes)."""
    x, w = torch.randn(3, 64, dtype=torch.float32), torch.randn(64, dtype=torch.float32)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        y = cpu_norm.rms_norm(x, w, 1e-6)
        s = cpu_norm.silu_and_mul(x)
    finally:
        torch.set_default_dtype(before)
    assert y.dtype == s.dtype == torch.float32
    torch.testing.assert_close(y, cpu_norm.rms_norm_ref(x, w, 1e-6), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(s, cpu_norm.silu_and_mul_ref(x), rtol=4e-7, atol=1e-30)
