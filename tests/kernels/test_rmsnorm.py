"""rms_norm and fused_add_rms_norm against their references (whose match with the model's RMSNorm is checked in
test_references_match_model.py)."""
from __future__ import annotations

import pytest
import torch

from braid_kernels import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from braid_kernels.rmsnorm import weight_first
from tests.kernels.common import assert_rounding_matches, assert_same_bits, exact_sum_values, norm_weight

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HIDDEN = [576, 1024, 100]  # SmolLM2, Qwen3-0.6B, and neither a power of two nor a multiple of 16
EPS = 1e-6


@pytest.mark.parametrize("static_weight", [False, True])  # the weight loaded after or before the PDL wait
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES)
def test_same_bits_when_sums_are_exact(device, dtype, hidden, static_weight):
    g = torch.Generator().manual_seed(hidden)
    x = exact_sum_values((3, hidden), dtype, device, g)
    weight = norm_weight(hidden, dtype, device, high=96.0, generator=g)  # Qwen3 k_norm-sized
    assert_same_bits(rms_norm(x, weight, EPS, static_weight=static_weight), rms_norm_ref(x, weight, EPS))


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_on_random_inputs(device, dtype, hidden):
    g = torch.Generator().manual_seed(hidden + 1)
    x = (3 * torch.randn(4, hidden, generator=g)).to(dtype).to(device)
    weight = norm_weight(hidden, dtype, device, high=96.0, generator=g)
    assert_rounding_matches(rms_norm(x, weight, EPS), rms_norm_ref(x, weight, EPS))


@pytest.mark.parametrize("static_weight", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_same_bits_and_inputs_untouched(device, dtype, static_weight):
    g = torch.Generator().manual_seed(2)
    x, residual = (exact_sum_values((5, 576), dtype, device, g) for _ in range(2))
    weight = norm_weight(576, dtype, device, generator=g)
    x0, residual0 = x.clone(), residual.clone()
    normed, h = fused_add_rms_norm(x, residual, weight, 1e-5, static_weight=static_weight)
    normed_ref, h_ref = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    assert_same_bits(h, h_ref)
    assert_same_bits(normed, normed_ref)
    assert_same_bits(x, x0)
    assert_same_bits(residual, residual0)


def test_fused_add_on_random_inputs(device):
    g = torch.Generator().manual_seed(3)
    x, residual = ((4 * torch.randn(3, 1024, generator=g)).to(torch.bfloat16).to(device) for _ in range(2))
    weight = norm_weight(1024, torch.bfloat16, device, generator=g)
    normed, h = fused_add_rms_norm(x, residual, weight, EPS)
    normed_ref, h_ref = fused_add_rms_norm_ref(x, residual, weight, EPS)
    assert_same_bits(h, h_ref)  # one rounded add: no summation order involved
    assert_rounding_matches(normed, normed_ref)


def test_leading_dims_and_strided_rows(device):
    """Per-head norm of a [tokens, heads, head_dim] slice of a wider row, as Qwen3's q_norm sees it."""
    g = torch.Generator().manual_seed(4)
    qkv = exact_sum_values((3, 8 * 64), torch.bfloat16, device, g)
    q = qkv[:, : 4 * 64].view(3, 4, 64)  # (T, heads, hd), row stride 512
    weight = norm_weight(64, torch.bfloat16, device, high=96.0, generator=g)
    out = rms_norm(q, weight, EPS)
    assert out.shape == (3, 4, 64)
    assert_same_bits(out, rms_norm_ref(q, weight, EPS))
    transposed = exact_sum_values((64, 3), torch.bfloat16, device, g).t()  # last dim not contiguous
    assert_same_bits(rms_norm(transposed, weight, EPS), rms_norm_ref(transposed, weight, EPS))
    strided_weight = torch.stack([weight, -weight], dim=1)[:, 0]  # copied before the launch: read after the wait
    assert not weight_first(strided_weight, True) and weight_first(weight, True) and not weight_first(weight, False)
    assert_same_bits(rms_norm(q, strided_weight, EPS, static_weight=True), rms_norm_ref(q, weight, EPS))


def test_no_rows(device):
    x = torch.empty(0, 64, dtype=torch.bfloat16, device=device)
    weight = torch.ones(64, dtype=torch.bfloat16, device=device)
    assert rms_norm(x, weight, EPS).shape == (0, 64)
    assert [t.shape for t in fused_add_rms_norm(x, x, weight, EPS)] == [(0, 64), (0, 64)]


def _weight_times_float32(x, weight, eps):
    """RMSNorm with the cast after the weight multiply: the mistake the seeds describe for Qwen3."""
    x32 = x.float()
    return (weight.float() * x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def test_comparison_catches_a_misplaced_cast(device):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 1024, generator=g).to(torch.bfloat16).to(device)
    weight = norm_weight(1024, torch.bfloat16, device, high=96.0, generator=g)
    with pytest.raises(AssertionError, match="elements differ"):
        assert_rounding_matches(_weight_times_float32(x, weight, EPS), rms_norm_ref(x, weight, EPS))


@pytest.mark.parametrize("call, message", [
    (lambda x, w: rms_norm(x, w[:-1], EPS), "weight must have shape"),
    (lambda x, w: rms_norm(x, w.float(), EPS), "dtypes must match"),
    (lambda x, w: rms_norm(x.int(), w, EPS), "x must have dtype"),
    (lambda x, w: rms_norm(x, w, -1.0), "eps must be"),
    (lambda x, w: rms_norm(x[0, 0], w, EPS), "at least one dimension"),
    (lambda x, w: rms_norm(x, w.view(1, -1), EPS), "weight must be 1-dimensional"),
    (lambda x, w: fused_add_rms_norm(x, x[:1], w, EPS), "residual must have shape"),
    (lambda x, w: fused_add_rms_norm(x, x.float(), w, EPS), "dtypes must match"),
    (lambda x, w: rms_norm(x.tolist(), w, EPS), "x must be a torch.Tensor"),
])
def test_bad_arguments_are_value_errors(device, call, message):
    x = torch.zeros(2, 64, dtype=torch.bfloat16, device=device)
    weight = torch.ones(64, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match=message):
        call(x, weight)


@pytest.mark.gpu
@pytest.mark.parametrize("static_weight", [False, True])
@pytest.mark.parametrize("num_tokens", [1, 7, 2048])
@pytest.mark.parametrize("hidden", [576, 1024])
def test_real_shapes_on_gpu(num_tokens, hidden, static_weight):
    g = torch.Generator().manual_seed(num_tokens)
    x = (4 * torch.randn(num_tokens, hidden, generator=g)).to(torch.bfloat16).cuda()
    residual = (4 * torch.randn(num_tokens, hidden, generator=g)).to(torch.bfloat16).cuda()
    weight = norm_weight(hidden, torch.bfloat16, "cuda", high=96.0, generator=g)
    assert_rounding_matches(rms_norm(x, weight, EPS, static_weight=static_weight), rms_norm_ref(x, weight, EPS))
    normed, h = fused_add_rms_norm(x, residual, weight, EPS, static_weight=static_weight)
    normed_ref, h_ref = fused_add_rms_norm_ref(x, residual, weight, EPS)
    assert_same_bits(h, h_ref)
    assert_rounding_matches(normed, normed_ref)
    exact = exact_sum_values((num_tokens, hidden), torch.bfloat16, "cuda", g)
    assert_same_bits(rms_norm(exact, weight, EPS, static_weight=static_weight), rms_norm_ref(exact, weight, EPS))
