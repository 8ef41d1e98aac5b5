"""braid_kernels/cpu_quant: the AVX-512 VNNI integer-dot product of packed GGUF weights against its plain-PyTorch
reference (linear_ref), against the float product of gguf's dequantised weights and the rounded x, and the packing
against gguf's own dequantisation; rows independent of each other; QuantLinear's "dot" form."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from braid_kernels import cpu_quant
from braid_kernels.quant_formats import dequantize_torch
from tests.support.gguf_quant import quantize

needs_library = pytest.mark.skipif(not cpu_quant.available(), reason=f"{cpu_quant.unavailable_reason()}")
QTYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


def _blocks(qtype: str, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(GGUF blocks of a random [n, k] weight, gguf's float32 dequantisation of them)."""
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((n, k)) * 0.05 + rng.standard_normal((n, 1)) * 0.01).astype(np.float32)
    blocks = torch.from_numpy(quantize(weight, qtype))
    return blocks, dequantize_torch(blocks, qtype, torch.float32)


def _shapes(qtype: str) -> list[tuple[int, int]]:
    """[n, k]: k a whole number of 64-weight chunks, or with a last lone block of 32 (not for the K-types, whose
    blocks are 256); n not a multiple of the kernel's 4 rows."""
    return [(37, 256), (8, 512)] if qtype in ("Q4_K", "Q5_K", "Q6_K") else [(37, 96), (64, 576), (5, 32)]


@pytest.mark.parametrize("qtype", QTYPES)
def test_pack_keeps_ggufs_values(qtype):
    """The packed codes, scales and offsets decode to gguf's dequantisation exactly; the 32-weight types keep
    float16 scales (GGUF's own d and m), the K-types float32, Q6_K one per 16 weights."""
    for n, k in _shapes(qtype):
        blocks, reference = _blocks(qtype, n, k)
        packed = cpu_quant.pack(blocks, qtype)
        assert packed.shape == (n, k)
        assert torch.equal(cpu_quant.dequantize(packed), reference)
        assert packed.bits == (8 if qtype in ("Q8_0", "Q6_K") else 5 if qtype in ("Q5_0", "Q5_1", "Q5_K") else 4)
        assert packed.codes.shape == (n, k * packed.bits // 8)
        assert packed.scales.dtype == (torch.float32 if qtype in ("Q4_K", "Q5_K", "Q6_K") else torch.float16)
        assert packed.group == (16 if qtype == "Q6_K" else 32)
        # offsets a fixed multiple of the scales (Q4_0 -8 d, Q5_0 -16 d, Q8_0 -128 d, Q6_K -32 d sc) are not
        # stored: Q4_0 0.5625 bytes a weight, Q5_0 0.6875, Q8_0 1.0625, Q6_K 1.25
        derived = qtype in ("Q4_0", "Q5_0", "Q8_0", "Q6_K")
        assert (packed.offsets is None) == derived
        per_weight = {"Q4_0": 0.5625, "Q5_0": 0.6875, "Q8_0": 1.0625, "Q6_K": 1.25, "Q4_1": 0.625, "Q5_1": 0.75,
                      "Q4_K": 0.75, "Q5_K": 0.875}[qtype]
        assert packed.nbytes == n * k * per_weight


def test_pack_refuses_other_types():
    blocks, _ = _blocks("Q4_0", 4, 64)
    with pytest.raises(ValueError, match="qtype"):
        cpu_quant.pack(blocks, "Q2_K")


def test_x_rounding_by_hand():
    """quantize_x_ref on values worked out by hand: dx = max |x| / 127, q = x / dx rounded half to even."""
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([254.0, -127.0, 3.0, 1.0])  # dx = 2: q = 127, -63.5 -> -64 (even), 1.5 -> 2, 0.5 -> 0
    q, dx, sums = cpu_quant.quantize_x_ref(x)
    assert dx.tolist() == [[2.0]]
    assert q[0, 0, :4].tolist() == [127, -64, 2, 0] and not q[0, 0, 4:].any()
    assert sums.tolist() == [[2.0 * (127 - 64 + 2)]]
    q, dx, _ = cpu_quant.quantize_x_ref(torch.zeros(1, 32))  # an all-zero block: dx 0, codes 0
    assert dx.tolist() == [[0.0]] and not q.any()
    # two terms: the remainder in steps of d / 256 (d = 2), q = 256 q1 + q2, dx = d / 256. 254: 127, remainder 0;
    # -127: q1 = -64, remainder 1 = 128 steps, clamped to 127; 3.004: 1.502 d -> q1 = 2, remainder -0.996 =
    # -127.488 steps -> -127, so 256 * 2 - 127 = 385
    x[0, 2] = 3.004
    q, dx, _ = cpu_quant.quantize_x_ref(x, terms=2)
    assert dx.tolist() == [[2.0 / 256]] and q[0, 0, :3].tolist() == [256 * 127, 256 * -64 + 127, 385]


@needs_library
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("x_terms", [1, 2])
def test_linear_matches_reference(qtype, x_terms):
    """The kernel against linear_ref (the same arithmetic in plain PyTorch, float64 sums) and against an independent
    float product: gguf's dequantised weights times x rounded as quantize_x_ref rounds it. Rows of x from 1 to 70
    (the kernel's tiles of 4 rows and tasks of 64), one and two threads; x in one int8 term (llama.cpp's rounding)
    or two (the default)."""
    for n, k in _shapes(qtype):
        blocks, reference = _blocks(qtype, n, k, seed=n + k)
        packed = cpu_quant.pack(blocks, qtype)
        for m in (1, 3, 4, 9, 70):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            q, dx, _ = cpu_quant.quantize_x_ref(x, x_terms)
            rounded_x = (q.double() * dx.double()[..., None]).view(m, k)
            expected = rounded_x @ reference.double().t()
            for threads in (1, 2):
                y = cpu_quant.linear(x, packed, threads=threads, x_terms=x_terms)
                scale = expected.abs().max().item()
                torch.testing.assert_close(y, cpu_quant.linear_ref(x, packed, x_terms), rtol=0, atol=2e-6 * scale)
                torch.testing.assert_close(y.double(), expected, rtol=0, atol=2e-6 * scale)
            # x's rounding is the only approximation: ~0.5% of the product with x itself in one int8 term,
            # ~256 times less in two
            exact = x @ reference.t()
            assert (y - exact).norm() / exact.norm() < (0.015 if x_terms == 1 else 1e-4)


@needs_library
def test_rows_are_independent_of_each_other():
    """Each row of the product equals that row computed alone, bit for bit (a request's answer must not depend on
    its batch), with two threads splitting the rows."""
    blocks, _ = _blocks("Q4_1", 96, 576)
    packed = cpu_quant.pack(blocks, "Q4_1")
    x = torch.randn(70, 576)
    together = cpu_quant.linear(x, packed, threads=2)
    for i in (0, 3, 64, 69):
        assert torch.equal(together[i], cpu_quant.linear(x[i:i + 1], packed, threads=1)[0])


@needs_library
def test_out_writes_only_its_columns():
    """out= a column range of a wider tensor (rows strided): those columns hold the product, the others are kept;
    x may be a view whose rows are strided too."""
    blocks, _ = _blocks("Q8_0", 40, 96)
    packed = cpu_quant.pack(blocks, "Q8_0")
    wide_x = torch.randn(5, 200)
    x = wide_x[:, 50:146]
    wide = torch.full((5, 100), 7.0)
    cpu_quant.linear(x, packed, out=wide[:, 30:70])
    assert torch.equal(wide[:, 30:70], cpu_quant.linear(x.contiguous(), packed))
    assert (wide[:, :30] == 7).all() and (wide[:, 70:] == 7).all()


@needs_library
def test_linear_refuses_bad_arguments():
    blocks, _ = _blocks("Q4_0", 8, 64)
    packed = cpu_quant.pack(blocks, "Q4_0")
    with pytest.raises(ValueError, match="float32"):
        cpu_quant.linear(torch.randn(2, 64, dtype=torch.float64), packed)
    with pytest.raises(ValueError, match=r"\[rows, 64\]"):
        cpu_quant.linear(torch.randn(2, 32), packed)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_quant.linear(torch.randn(64, 2).t(), packed)
    with pytest.raises(ValueError, match="out"):
        cpu_quant.linear(torch.randn(2, 64), packed, out=torch.empty(2, 9))


@needs_library
def test_quant_linear_dot_form_with_mixed_parts():
    """QuantLinear finalised in the "dot" form: the quantised parts packed (Q6_K's with a scale per 16 weights), the
    float part kept; the product equals the decoded weights' within x's int8 rounding, and equals the parts'
    own kernel products exactly."""
    from braidinfer.layers.quant_linear import QuantLinear
    from braidinfer.loader.quantized import QuantizedTensor

    k = 256
    parts = [("Q4_K", 32), (None, 16), ("Q6_K", 16), ("Q8_0", 48)]
    layer = QuantLinear(k, sum(rows for _, rows in parts), bias=True, dtype=torch.float32)
    decoded, start = [], 0
    for i, (qtype, rows) in enumerate(parts):
        if qtype is None:
            weight = torch.randn(rows, k) * 0.05
            layer.set_part(start, weight)
            decoded.append(weight)
        else:
            blocks, reference = _blocks(qtype, rows, k, seed=i)
            layer.set_part(start, QuantizedTensor(blocks, qtype, (rows, k)))
            decoded.append(reference)
        start += rows
    layer.finalize("dot")
    torch.nn.init.normal_(layer.bias)
    assert layer.kinds == ["dot", "float", "dot", "dot"] and layer.qtypes == ["Q4_K", None, "Q6_K", "Q8_0"]
    assert "cpu_quant" in layer.kernel_path()
    x = torch.randn(3, k)
    y = layer(x)
    exact = x @ torch.cat(decoded).t() + layer.bias
    assert (y - exact).norm() / exact.norm() < 0.015
    torch.testing.assert_close(y[:, :32], cpu_quant.linear(x, layer._dot[0]) + layer.bias[:32], rtol=0, atol=0)
    torch.testing.assert_close(layer(x[None])[0], y)  # a 3-d x: the same rows


@needs_library
def test_quant_linear_dot_parts_write_their_columns():
    """A projection whose parts are all in the "dot" form, of different types (Q4_K_M's Q4_K q/k beside a Q6_K v),
    writes each part's product into its columns: equal, bit for bit, to the parts' products concatenated; for 1, 3
    and 70 rows, x with strided rows, a one-row x of any row stride, and a bias."""
    from braidinfer.layers.quant_linear import QuantLinear
    from braidinfer.loader.quantized import QuantizedTensor

    k = 512
    parts = [("Q4_K", 32), ("Q6_K", 16), ("Q4_K", 8), ("Q8_0", 24)]
    layer = QuantLinear(k, sum(rows for _, rows in parts), bias=True, dtype=torch.float32)
    start = 0
    for i, (qtype, rows) in enumerate(parts):
        layer.set_part(start, QuantizedTensor(_blocks(qtype, rows, k, seed=i)[0], qtype, (rows, k)))
        start += rows
    layer.finalize("dot")
    torch.nn.init.normal_(layer.bias)
    assert layer.kinds == ["dot"] * 4
    gen = torch.Generator().manual_seed(0)
    for x in (torch.randn(3, 2 * k, generator=gen)[:, :k], torch.randn(70, k, generator=gen),
              torch.randn(k, 1, generator=gen).t()):  # the last: one row, strides (1, 1)
        expected = torch.cat([cpu_quant.linear(x.contiguous(), w) for w in layer._dot.values()], dim=1)
        assert torch.equal(layer(x), expected + layer.bias)
