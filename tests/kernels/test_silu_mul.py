"""silu_and_mul against its reference (whose match with the model's MLP is checked in
test_references_match_model.py)."""
from __future__ import annotations

import pytest
import torch

from braid_kernels import silu_and_mul, silu_and_mul_ref
from tests.kernels.common import assert_rounding_matches, assert_same_bits


def _assert_matches(actual, expected, device):
    """On CUDA kernel and torch both compute expf and an exact division: same bits. Under the interpreter numpy's
    exp may differ from torch's CPU exp in the last float32 bit."""
    if device == "cuda":
        assert_same_bits(actual, expected)
    else:
        assert_rounding_matches(actual, expected)


@pytest.mark.parametrize("d", [1536, 100, 1])  # SmolLM2's intermediate size; more than one block; odd
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference(device, dtype, d):
    g = torch.Generator().manual_seed(d)
    x = (4 * torch.randn(3, 2 * d, generator=g)).to(dtype).to(device)
    _assert_matches(silu_and_mul(x), silu_and_mul_ref(x), device)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy's exp(100) = inf, as meant
def test_extreme_gates(device):
    """exp(-gate) overflowing (silu -> -0) and vanishing (silu -> gate)."""
    gate = torch.tensor([-100.0, -88.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 88.0, 100.0])
    x = torch.cat([gate, torch.linspace(-3, 3, gate.numel())]).to(torch.bfloat16).to(device)
    _assert_matches(silu_and_mul(x), silu_and_mul_ref(x), device)


def test_leading_dims_and_strided_rows(device):
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(2, 3, 300, generator=g).to(torch.bfloat16).to(device)
    x = wide[..., :200]  # rows of a wider tensor
    out = silu_and_mul(x)
    assert out.shape == (2, 3, 100)
    _assert_matches(out, silu_and_mul_ref(x), device)


def test_no_rows(device):
    assert silu_and_mul(torch.empty(0, 8, device=device)).shape == (0, 4)


@pytest.mark.parametrize("x, message", [
    (torch.zeros(2, 7), "even size"),
    (torch.zeros(()), "even size"),
    (torch.zeros(2, 8, dtype=torch.int32), "x must have dtype"),
])
def test_bad_arguments_are_value_errors(device, x, message):
    with pytest.raises(ValueError, match=message):
        silu_and_mul(x.to(device))


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 7, 2048])
@pytest.mark.parametrize("d", [1536, 3072])  # SmolLM2-135M, Qwen3-0.6B
def test_real_shapes_on_gpu(num_tokens, d):
    g = torch.Generator().manual_seed(num_tokens)
    x = (4 * torch.randn(num_tokens, 2 * d, generator=g)).to(torch.bfloat16).cuda()
    assert_same_bits(silu_and_mul(x), silu_and_mul_ref(x))
