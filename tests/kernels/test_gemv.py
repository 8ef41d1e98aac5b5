"""The GEMV kernels against their references: the prologue bit for bit (read through an identity weight, whose
product is exact in any order), the product to the order of float32 accumulation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from braid_kernels import (
    fused_add_rms_norm_gemv,
    fused_add_rms_norm_gemv_ref,
    fused_add_rms_norm_ref,
    gemv,
    gemv_ref,
    rms_norm_gemv,
    rms_norm_gemv_ref,
    rms_norm_ref,
    silu_and_mul_gemv,
    silu_and_mul_gemv_ref,
    silu_and_mul_ref,
)
from braid_kernels.gemv import MAX_ROWS, GemvConfig
from tests.kernels.common import (
    assert_rounding_matches,
    assert_same_bits,
    exact_sum_values,
    norm_weight,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-6
MODES = ["none", "rms_norm", "add_rms_norm", "silu_and_mul"]
# Several programs' worth of rows and several loop steps over K, both with ragged ends (the CPU has 1 "SM", so the
# default configuration would put everything in few programs).
SMALL = GemvConfig(block_n=16, block_k=32, num_warps=4, num_stages=2)


def _inputs(mode, num_rows, k, dtype, device, g, exact=False):
    """(x, residual, norm weight) for `mode`; x is [num_rows, 2k] for silu_and_mul."""
    make = (lambda shape: exact_sum_values(shape, dtype, device, g)) if exact else (
        lambda shape: (3 * torch.randn(shape, generator=g)).to(dtype).to(device))
    x = make((num_rows, 2 * k if mode == "silu_and_mul" else k))
    return x, make((num_rows, k)), norm_weight(k, dtype, device, high=96.0, generator=g)


def _run(mode, x, residual, nw, weight, bias=None, config=None, ref=False):
    """y (and h for add_rms_norm) of `mode`, by the kernel or, with ref, the reference."""
    if mode == "none":
        return gemv_ref(x, weight, bias) if ref else gemv(x, weight, bias, config=config)
    if mode == "rms_norm":
        return (rms_norm_gemv_ref(x, nw, EPS, weight, bias) if ref
                else rms_norm_gemv(x, nw, EPS, weight, bias, config=config))
    if mode == "add_rms_norm":
        return (fused_add_rms_norm_gemv_ref(x, residual, nw, EPS, weight, bias) if ref
                else fused_add_rms_norm_gemv(x, residual, nw, EPS, weight, bias, config=config))
    return silu_and_mul_gemv_ref(x, weight, bias) if ref else silu_and_mul_gemv(x, weight, bias, config=config)


def _prologue_ref(mode, x, residual, nw):
    return {"none": lambda: x, "rms_norm": lambda: rms_norm_ref(x, nw, EPS),
            "add_rms_norm": lambda: fused_add_rms_norm_ref(x, residual, nw, EPS)[0],
            "silu_and_mul": lambda: silu_and_mul_ref(x)}[mode]()


def assert_product_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal but for the order of a float32 dot product: within an output step (bf16/fp16) or a few float32 ulps
    of the largest element (cancellation leaves small elements with the large ones' absolute error)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tolerance = 2 * torch.finfo(expected.dtype).eps if expected.dtype != torch.float32 else 1e-5
    scale = expected.float().abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tolerance, atol=tolerance * scale)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prologue_same_bits(device, dtype, mode):
    """Through an identity weight y is the prologue's output exactly; sums of squares exact in float32, so the
    norm's summation order does not matter either."""
    g = torch.Generator().manual_seed(len(mode))
    k = 100  # ragged against the block sizes
    x, residual, nw = _inputs(mode, 3, k, dtype, device, g, exact=True)
    eye = torch.eye(k, dtype=dtype, device=device)
    out = _run(mode, x, residual, nw, eye, config=GemvConfig(block_n=32, block_k=64, num_warps=4, num_stages=2))
    y = out[0] if mode == "add_rms_norm" else out
    expected = _prologue_ref(mode, x, residual, nw)
    if mode == "silu_and_mul" and device == "cpu":
        assert_rounding_matches(y, expected)  # numpy's exp under the interpreter (see test_silu_mul)
    else:
        assert_same_bits(y, expected)
    if mode == "add_rms_norm":
        assert_same_bits(out[1], x + residual)


@pytest.mark.parametrize("mode", ["rms_norm", "add_rms_norm"])
def test_norm_prologue_on_random_inputs(device, mode):
    g = torch.Generator().manual_seed(7)
    x, residual, nw = _inputs(mode, 4, 320, torch.bfloat16, device, g)
    eye = torch.eye(320, dtype=torch.bfloat16, device=device)
    out = _run(mode, x, residual, nw, eye, config=GemvConfig(block_n=32, block_k=512, num_warps=4, num_stages=1))
    assert_rounding_matches(out[0] if mode == "add_rms_norm" else out, _prologue_ref(mode, x, residual, nw))


@pytest.mark.parametrize("dtype, num_rows, n, k, bias, config", [
    *[(dtype, 3, 100, 100, True, SMALL) for dtype in DTYPES],  # N and K ragged, several programs and loop steps
    (torch.bfloat16, 1, 96, 64, False, None),
    (torch.bfloat16, MAX_ROWS, 72, 96, True, GemvConfig(block_n=16, block_k=64, num_warps=4, num_stages=1)),
])
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(device, dtype, mode, num_rows, n, k, bias, config):
    g = torch.Generator().manual_seed(num_rows * n + k)
    x, residual, nw = _inputs(mode, num_rows, k, dtype, device, g)
    weight = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype).to(device)
    b = torch.randn(n, generator=g).to(dtype).to(device) if bias else None
    x0, residual0 = x.clone(), residual.clone()
    got, want = _run(mode, x, residual, nw, weight, b, config), _run(mode, x, residual, nw, weight, b, ref=True)
    if mode == "add_rms_norm":
        assert_same_bits(got[1], want[1])
        got, want = got[0], want[0]
    assert_product_close(got, want)
    assert_same_bits(x, x0)
    assert_same_bits(residual, residual0)


def test_strided_rows(device):
    """x as rows of a wider tensor, as the attention output or a slice of the hidden states may be."""
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(2, 160, generator=g).to(torch.bfloat16).to(device)
    weight = (torch.randn(48, 64, generator=g) / 8).to(torch.bfloat16).to(device)
    nw = norm_weight(64, torch.bfloat16, device, generator=g)
    assert_product_close(gemv(wide[:, 16:80], weight), gemv_ref(wide[:, 16:80], weight))
    assert_product_close(rms_norm_gemv(wide[:, :64], nw, EPS, weight), rms_norm_gemv_ref(wide[:, :64], nw, EPS, weight))
    assert_product_close(silu_and_mul_gemv(wide[:, :128], weight), silu_and_mul_gemv_ref(wide[:, :128], weight))


def test_no_rows(device):
    x = torch.empty(0, 64, dtype=torch.bfloat16, device=device)
    weight = torch.ones(32, 64, dtype=torch.bfloat16, device=device)
    nw = torch.ones(64, dtype=torch.bfloat16, device=device)
    assert gemv(x, weight).shape == (0, 32)
    assert [t.shape for t in fused_add_rms_norm_gemv(x, x, nw, EPS, weight)] == [(0, 32), (0, 64)]


@pytest.mark.parametrize("call, message", [
    (lambda x, w, nw: gemv(x, w[:, :32]), "x must have 32 columns"),
    (lambda x, w, nw: gemv(x[0], w), "x must be 2-dimensional"),
    (lambda x, w, nw: gemv(x, w.float()), "dtypes must match"),
    (lambda x, w, nw: gemv(x.int(), w), "x must have dtype"),
    (lambda x, w, nw: gemv(x, w.t().contiguous().t()), "weight must be contiguous"),
    (lambda x, w, nw: gemv(x.t().contiguous().t(), w), "x must be contiguous in its last dimension"),
    (lambda x, w, nw: gemv(x.repeat(MAX_ROWS, 1), w), f"at most {MAX_ROWS} rows"),
    (lambda x, w, nw: gemv(x, w, w[0]), "bias must have shape"),
    (lambda x, w, nw: rms_norm_gemv(x, nw[:8], EPS, w), "norm_weight must have shape"),
    (lambda x, w, nw: rms_norm_gemv(x, nw, -1.0, w), "eps must be"),
    (lambda x, w, nw: fused_add_rms_norm_gemv(x, x[:1], nw, EPS, w), "residual must have shape"),
    (lambda x, w, nw: fused_add_rms_norm_gemv(x, x.half(), nw, EPS, w), "dtypes must match"),
    (lambda x, w, nw: silu_and_mul_gemv(x, w), "x must have 128 columns"),
    (lambda x, w, nw: gemv(x.tolist(), w), "x must be a torch.Tensor"),
])
def test_bad_arguments_are_value_errors(device, call, message):
    x = torch.zeros(2, 64, dtype=torch.bfloat16, device=device)
    weight = torch.zeros(32, 64, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match=message):
        call(x, weight, torch.ones(64, dtype=torch.bfloat16, device=device))


# Qwen3-0.6B and SmolLM2-135M: qkv, o, gate_up, down as (mode, N, K).
REAL_SHAPES = [("add_rms_norm", 4096, 1024), ("none", 1024, 2048), ("add_rms_norm", 6144, 1024),
               ("silu_and_mul", 1024, 3072), ("add_rms_norm", 960, 576), ("none", 576, 576),
               ("add_rms_norm", 3072, 576), ("silu_and_mul", 576, 1536), ("rms_norm", 4096, 1024)]


@pytest.mark.gpu
@pytest.mark.parametrize("num_rows", [1, MAX_ROWS])
@pytest.mark.parametrize("mode, n, k", REAL_SHAPES)
def test_real_shapes_on_gpu(mode, n, k, num_rows):
    """Default launch configurations at the models' shapes, against float32 products of the reference's
    prologue (cuBLAS may reduce split-K partials in bf16); the prologue through an identity weight, bit for bit."""
    g = torch.Generator().manual_seed(n + k + num_rows)
    x, residual, nw = _inputs(mode, num_rows, k, torch.bfloat16, "cuda", g)
    weight = (torch.randn(n, k, generator=g) / k ** 0.5).to(torch.bfloat16).cuda()
    out = _run(mode, x, residual, nw, weight)
    y = out[0] if mode == "add_rms_norm" else out
    prologue = _prologue_ref(mode, x, residual, nw)
    assert_product_close(y, F.linear(prologue.float(), weight.float()).to(torch.bfloat16))
    again = _run(mode, x, residual, nw, weight)
    assert_same_bits(again[0] if mode == "add_rms_norm" else again, y)  # no race between programs

    exact_x, exact_residual, _ = _inputs(mode, num_rows, k, torch.bfloat16, "cuda", g, exact=True)
    eye = torch.eye(k, dtype=torch.bfloat16, device="cuda")
    out = _run(mode, exact_x, exact_residual, nw, eye)
    assert_same_bits(out[0] if mode == "add_rms_norm" else out, _prologue_ref(mode, exact_x, exact_residual, nw))
