"""x rounded to int8 runs (braid_kernels/int8_rows.py): the standalone kernel against its PyTorch reference and a
hand bound, the norm and SiLU-and-mul kernels that write their output in this form against the standalone rounding of
their plain output (the same bytes), and quant_linear taking the rows."""
from __future__ import annotations

import pytest
import torch

from braid_kernels import (
    Int8Rows,
    fused_add_rms_norm,
    quantize_rows,
    quantize_rows_ref,
    rms_norm,
    rms_norm_int8,
    silu_and_mul,
    silu_and_mul_int8,
)
from braid_kernels.quant import quant_linear, to_planes
from tests.kernels.common import assert_same_bits, norm_weight
from tests.support.gguf_quant import quantize

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _x(rows: int, cols: int, dtype, device, seed: int = 0) -> torch.Tensor:
    """Values of a few magnitudes per row, one all-zero run of 32 (scale 0) and exact ties for the rounding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-2, 2, rows)[:, None]
    if cols >= 64:
        x[:, 32:64] = 0.0
        x[0, :3] = torch.tensor([127.0, 0.5, -0.5])  # a run whose amax is 127: +-0.5 sit on rounding ties
    return x.to(dtype).to(device)


def _assert_same_rows(got: Int8Rows, want: Int8Rows) -> None:
    assert got.dtype == want.dtype
    for a, b in zip(got[:3], want[:3]):
        assert_same_bits(a.cpu(), b.cpu())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 32), (3, 96), (2, 576), (1, 4096)])
def test_quantize_rows_matches_reference(device, dtype, shape):
    x = _x(*shape, dtype, device, seed=shape[1])
    got = quantize_rows(x)
    _assert_same_rows(got, quantize_rows_ref(x))
    assert got.q.dtype == torch.int8 and got.shape == x.shape


def test_int8_rows_hold_x_within_half_a_level(device):
    """Hand bound: each value is within half of its run's level (max|x| / 127 / 2) of x; the largest is exact."""
    x = _x(4, 256, torch.float32, device, seed=3)
    rows = quantize_rows(x)
    runs = x.cpu().view(4, 8, 32)
    level = runs.abs().amax(dim=-1, keepdim=True) / 127
    err = (rows.dequantize().cpu().view(4, 8, 32) - runs).abs()
    assert (err <= level / 2 * (1 + 1e-5) + 1e-30).all()
    assert rows.q.abs().max() == 127
    halves = rows.q.cpu().float().view(4, 8, 2, 16).sum(-1)
    assert (rows.sx.cpu().view(4, 8, 2) == rows.dx.cpu()[:, :, None] * halves).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 576, 96, 2048])  # SmolLM2's 576; not a power of two; 4 slices of 512
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("static_weight", [False, True])  # the weight (its slice's) loaded before the PDL wait
def test_rms_norm_int8_is_the_rounded_norm(device, dtype, hidden, with_residual, static_weight):
    x = _x(3, hidden, dtype, device, seed=hidden)
    w = norm_weight(hidden, dtype, device, generator=torch.Generator().manual_seed(1))
    if with_residual:
        residual = _x(3, hidden, dtype, device, seed=hidden + 1)
        normed, h_want = fused_add_rms_norm(x, residual, w, 1e-6)
        rows, h = rms_norm_int8(x, w, 1e-6, residual=residual, static_weight=static_weight)
        assert_same_bits(h.cpu(), h_want.cpu())
    else:
        normed = rms_norm(x, w, 1e-6)
        rows, h = rms_norm_int8(x, w, 1e-6, static_weight=static_weight)
        assert h is None
    _assert_same_rows(rows, quantize_rows(normed))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy exp of large -gate
@pytest.mark.parametrize("d", [32, 1056])  # one run; several programs' columns, the last program's partial
def test_silu_and_mul_int8_is_the_rounded_activation(device, dtype, d):
    x = _x(2, 2 * d, dtype, device, seed=d)
    _assert_same_rows(silu_and_mul_int8(x), quantize_rows(silu_and_mul(x)))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q8_0"])
def test_quant_linear_takes_int8_rows(device, qtype):
    """The rows of x give the bits that x itself gives on the dot path, with and without a bias."""
    n, k = 24, 512
    g = torch.Generator().manual_seed(5)
    blocks = to_planes(torch.from_numpy(quantize(torch.randn(n, k, generator=g).numpy(), qtype)), qtype).to(device)
    x = _x(2, k, torch.bfloat16, device, seed=6)
    bias = torch.randn(n, generator=g).to(torch.bfloat16).to(device)
    for b in (None, bias):
        want = quant_linear(x, blocks, qtype, b, path="dot")
        assert_same_bits(quant_linear(quantize_rows(x), blocks, qtype, b).cpu(), want.cpu())


def test_bad_int8_arguments_are_value_errors(device):
    x = torch.zeros(2, 48, dtype=torch.bfloat16, device=device)
    w = torch.ones(48, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_rows(x)
    with pytest.raises(ValueError, match="multiple of 32"):
        rms_norm_int8(x, w, 1e-6)
    with pytest.raises(ValueError, match="multiple of 32"):
        silu_and_mul_int8(torch.zeros(2, 96, dtype=torch.bfloat16, device=device))
    blocks = to_planes(torch.from_numpy(quantize(torch.randn(8, 256).numpy(), "Q4_K")), "Q4_K").to(device)
    rows = quantize_rows(torch.zeros(2, 256, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="dot path"):
        quant_linear(rows, blocks, "Q4_K", path="gemm")
    with pytest.raises(ValueError, match="shape"):  # 512 columns for a 256-column matrix
        quant_linear(quantize_rows(torch.zeros(2, 512, dtype=torch.bfloat16, device=device)), blocks, "Q4_K")
    with pytest.raises(ValueError, match="at most 8 rows"):
        quant_linear(quantize_rows(torch.zeros(9, 256, dtype=torch.bfloat16, device=device)), blocks, "Q4_K")
    with pytest.raises(ValueError, match="contiguous"):
        quant_linear(rows._replace(q=rows.q.t().contiguous().t()), blocks, "Q4_K")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("with_residual", [False, True])
def test_quant_linear_layer_computes_a_deferred_norm_once(with_residual):
    """A QuantLinear of mixed parts (Q4_K then Q6_K) given a deferred norm (the GEMV plan at one row) computes the
    bits it computes from the norm's plain output, and leaves the residual stream the norm's add gives."""
    from braidinfer.layers.norm import DeferredNorm, DeferredResidual, RMSNorm
    from braidinfer.layers.quant_linear import QuantLinear
    from braidinfer.loader.quantized import QuantizedTensor

    cols, g = 512, torch.Generator().manual_seed(9)
    layer = QuantLinear(cols, 96, bias=False, dtype=torch.bfloat16)
    for start, rows, qtype in [(0, 64, "Q4_K"), (64, 32, "Q6_K")]:
        blocks = torch.from_numpy(quantize(torch.randn(rows, cols, generator=g).numpy(), qtype))
        layer.set_part(start, QuantizedTensor(blocks, qtype, (rows, cols)))
    layer.finalize("blocks")
    layer.cuda()
    norm = RMSNorm(cols, 1e-6).to(torch.bfloat16).cuda()
    x = _x(1, cols, torch.bfloat16, "cuda", seed=10)
    residual = _x(1, cols, torch.bfloat16, "cuda", seed=11) if with_residual else None
    if residual is None:
        plain, h_want = rms_norm(x, norm.weight, norm.eps), None
    else:
        plain, h_want = fused_add_rms_norm(x, residual, norm.weight, norm.eps)
    deferred = DeferredNorm(norm, x, residual)
    assert_same_bits(layer(deferred).cpu(), layer(plain).cpu())
    if residual is not None:
        assert_same_bits(DeferredResidual(deferred).value().cpu(), h_want.cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_rows", [1, 3])
def test_quant_linear_layer_of_mixed_parts_is_its_parts_side_by_side(num_rows):
    """A QuantLinear of mixed parts (Q4_K, Q6_K, Q4_K) with a bias: at one row each part writes straight into its
    columns of the output, at three the parts are concatenated; either way the bits of each part's quant_linear side
    by side, plus the bias."""
    from braidinfer.layers.quant_linear import QuantLinear
    from braidinfer.loader.quantized import QuantizedTensor

    cols, g = 512, torch.Generator().manual_seed(12)
    layer = QuantLinear(cols, 160, bias=True, dtype=torch.bfloat16)
    parts = [(0, 64, "Q4_K"), (64, 32, "Q6_K"), (96, 64, "Q4_K")]
    for start, rows, qtype in parts:
        blocks = torch.from_numpy(quantize(torch.randn(rows, cols, generator=g).numpy(), qtype))
        layer.set_part(start, QuantizedTensor(blocks, qtype, (rows, cols)))
    layer.finalize("blocks")
    with torch.no_grad():
        layer.bias.copy_(torch.randn(160, generator=g).to(torch.bfloat16))
    layer.cuda()
    assert layer.qtypes == ["Q4_K", "Q6_K", "Q4_K"]
    x = _x(num_rows, cols, torch.bfloat16, "cuda", seed=13)
    rows = quantize_rows(x)  # the layer rounds x to int8 once for every part
    want = torch.cat([quant_linear(rows, getattr(layer, f"part{i}"), q) for i, q in enumerate(layer.qtypes)], dim=-1)
    assert_same_bits(layer(x).cpu(), (want + layer.bias).cpu())


@pytest.mark.parametrize("order", ["int8 first", "value first", "project first"])
def test_deferred_norm_computes_each_form_and_the_residual_once(device, order):
    """A deferred add + RMSNorm asked for its int8 rows, its plain value and a fused projection, in any order: each
    form equals the unfused kernels' result, and the residual stream is the add's, whichever form computed it."""
    from braidinfer.layers.norm import DeferredNorm, DeferredResidual, RMSNorm

    hidden = 64
    norm = RMSNorm(hidden, 1e-6).to(torch.bfloat16).to(device)
    with torch.no_grad():
        norm.weight.copy_(norm_weight(hidden, torch.bfloat16, device, generator=torch.Generator().manual_seed(2)))
    x, residual = _x(1, hidden, torch.bfloat16, device, seed=3), _x(1, hidden, torch.bfloat16, device, seed=4)
    want, h = fused_add_rms_norm(x, residual, norm.weight, norm.eps)
    weight = torch.randn(8, hidden, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16).to(device)
    deferred = DeferredNorm(norm, x, residual)
    steps = {"int8 first": ["int8", "value", "project"], "value first": ["value", "project", "int8"],
             "project first": ["project", "int8", "value"]}[order]
    for step in steps:
        if step == "int8":
            _assert_same_rows(deferred.int8_rows(), quantize_rows(want))
            assert deferred.int8_rows() is deferred.int8_rows()  # kept, not recomputed
        elif step == "value":
            assert_same_bits(deferred.value().cpu(), want.cpu())
        else:
            got = deferred.project(weight, None).float()
            torch.testing.assert_close(got, (want.float() @ weight.float().T), rtol=2e-2, atol=2e-2)
        assert_same_bits(DeferredResidual(deferred).value().cpu(), h.cpu())


def test_deferred_silu_and_mul_gives_both_forms(device):
    from braidinfer.layers.activation import DeferredSiluAndMul

    x = _x(1, 2 * 64, torch.bfloat16, device, seed=7)
    deferred = DeferredSiluAndMul(x)
    _assert_same_rows(deferred.int8_rows(), quantize_rows(silu_and_mul(x)))
    assert_same_bits(deferred.value().cpu(), silu_and_mul(x).cpu())
