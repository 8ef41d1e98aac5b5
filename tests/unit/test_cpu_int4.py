"""QuantLinear's CPU int4 form (braidinfer/layers/cpu_int4.py, torch's `_weight_int4pack_mm_for_cpu`): the 4-bit terms
each GGUF type splits into, against gguf's numpy decoder, and the layer's products against a float32 matmul of the
decoded weights, within what rounding x (and the weights) to bfloat16 costs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from braid_kernels.quant_formats import NIBBLE_QTYPES, nibble_terms
from braidinfer.layers import cpu_int4
from braidinfer.layers.quant_linear import QuantLinear
from braidinfer.loader.quantized import QuantizedTensor
from tests.unit.test_quantized_weights import _blocks, _reference


@pytest.mark.parametrize("qtype", sorted(NIBBLE_QTYPES))
def test_nibble_terms_rebuild_gguf_values(qtype):
    blocks = _blocks(24, 512, qtype, seed=5)
    terms = nibble_terms(blocks, qtype)
    assert len(terms) == (2 if qtype in ("Q8_0", "Q5_0", "Q5_1", "Q5_K") else 1)
    weight = torch.zeros(24, 512)
    for codes, scale, offset in terms:
        assert codes.dtype == torch.uint8 and codes.shape == (24, 512) and int(codes.max()) <= 15
        assert scale.shape == offset.shape == (24, 512 // 32)
        weight += scale.repeat_interleave(32, 1) * codes.float() + offset.repeat_interleave(32, 1)
    ref = _reference(blocks, qtype)
    torch.testing.assert_close(weight, ref, rtol=0, atol=ref.abs().max().item() * 2 ** -22)


def test_nibble_terms_refuse_q6_k():
    with pytest.raises(ValueError, match="4-bit terms"):
        nibble_terms(_blocks(4, 256, "Q6_K", seed=0), "Q6_K")


def _int4_layer(parts, cols: int, bias: bool = False) -> QuantLinear:
    rows = sum(b.shape[0] for b, _ in parts)
    layer = QuantLinear(cols, rows, bias=bias, dtype=torch.float32)
    if bias:
        with torch.no_grad():
            layer.bias.copy_(torch.randn(rows))
    start = 0
    for blocks, qtype in parts:
        layer.set_part(start, QuantizedTensor(blocks, qtype, (blocks.shape[0], cols)) if qtype else blocks)
        start += blocks.shape[0]
    layer.finalize("int4")
    return layer


def _bf16_error(x: torch.Tensor, weight: torch.Tensor) -> float:
    """Largest error of the product with x and the weights rounded to bfloat16 (the dequantised bf16 path)."""
    exact = x.double() @ weight.double().t()
    rounded = x.bfloat16().double() @ weight.bfloat16().double().t()
    return (rounded - exact).abs().max().item()


@pytest.mark.parametrize("qtype", sorted(NIBBLE_QTYPES))
@pytest.mark.parametrize("rows", [1, 7])
def test_int4_linear_matches_the_decoded_weights(qtype, rows):
    torch.manual_seed(rows)
    blocks = _blocks(48, 512, qtype, seed=1)
    layer = _int4_layer([(blocks, qtype)], 512)
    assert layer.kinds == ["int4"] and "int4" in layer.kernel_path()
    weight = _reference(blocks, qtype)
    x = torch.randn(rows, 512)
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 48)
    err = (got.double() - x.double() @ weight.double().t()).abs().max().item()
    assert err <= 3 * _bf16_error(x, weight), (err, _bf16_error(x, weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_takes_rows_that_are_not_contiguous(dtype):
    """The int4 op refuses strided input; the layer gives it a contiguous copy (a float32 x's strides survive the
    cast to bfloat16)."""
    torch.manual_seed(0)
    blocks = _blocks(48, 512, "Q4_0", seed=1)
    layer = _int4_layer([(blocks, "Q4_0")], 512)
    x = torch.randn(512, 3).t().to(dtype)  # [3, 512], a column-major view
    assert not x.is_contiguous()
    torch.testing.assert_close(layer(x), layer(x.contiguous()), rtol=0, atol=0)


needs_packing = pytest.mark.skipif(not cpu_int4.layout_known(),
                                   reason="this torch build packs int4 codes in another layout (not AVX-512)")


@needs_packing
@pytest.mark.parametrize("qtype", sorted(NIBBLE_QTYPES))
@pytest.mark.parametrize("product", [None, torch.float32])
def test_many_rows_multiply_by_the_decoded_weights(qtype, product, monkeypatch):
    """With decoded_rows set, from that many rows of x the layer decodes the packed codes (cpu_int4.decode) and
    multiplies in product_dtype() (or float32, as on CPUs without AMX) instead of calling the int4 op; the product is
    still the decoded weights' within bfloat16 rounding, whole or in pieces (DECODE_BLOCK_WEIGHTS; the last one
    shorter)."""
    torch.manual_seed(3)
    blocks = _blocks(320, 512, qtype, seed=2)
    layer = _int4_layer([(blocks, qtype)], 512)
    layer.decoded_rows = cpu_int4.DEQUANTIZE_ROWS
    weight = _reference(blocks, qtype)
    x = torch.randn(cpu_int4.DEQUANTIZE_ROWS + 3, 512)

    def refuse(*args):
        raise AssertionError("the int4 op ran")

    monkeypatch.setattr(cpu_int4, "_MM", refuse)
    if product is not None:
        monkeypatch.setattr(cpu_int4, "product_dtype", lambda: product)
    whole = layer(x)
    monkeypatch.setattr(cpu_int4, "DECODE_BLOCK_WEIGHTS", 128 * 512)  # pieces of 128, 128 and 64 rows
    pieces = layer(x)
    for got in (whole, pieces):
        assert got.dtype == torch.float32 and got.shape == (x.shape[0], 320)
        err = (got.double() - x.double() @ weight.double().t()).abs().max().item()
        assert err <= 3 * _bf16_error(x, weight), (err, _bf16_error(x, weight))


def test_many_rows_keep_the_int4_op_by_default(monkeypatch):
    """decoded_rows None (the default): every step goes through the int4 op, whose rows do not depend on each other:
    a row's output is the same in 130 rows as alone."""
    def refuse(*args):
        raise AssertionError("the decoded product ran")

    monkeypatch.setattr(cpu_int4, "_decoded_linear", refuse)
    blocks = _blocks(128, 256, "Q4_1", seed=3)
    layer = _int4_layer([(blocks, "Q4_1")], 256)
    assert layer.decoded_rows is None
    x = torch.randn(130, 256)
    many = layer(x)
    assert torch.equal(many, torch.cat([layer(x[i:i + 1]) for i in range(x.shape[0])]))


@needs_packing
@pytest.mark.parametrize("qtype,cols", [("Q4_1", 256), ("Q8_0", 96), ("Q4_0", 32)])
def test_decode_reads_the_op_packing(qtype, cols):
    """decode(pack(W)) is W as the int4 op computes it: (c - 8) s + z per term with the bfloat16 scales and zeros
    (the order of the float32 arithmetic aside), rows sliced in blocks of 64."""
    blocks = _blocks(128, cols, qtype, seed=7)
    terms = cpu_int4.pack(blocks, qtype)
    want = torch.zeros(128, cols)
    for (codes, _, _), (_, scales_zeros) in zip(nibble_terms(blocks, qtype), terms):
        scale, zero = (scales_zeros[..., i].t().float().repeat_interleave(32, 1) for i in (0, 1))
        want += (codes.float() - 8) * scale + zero
    atol = want.abs().max().item() * 2 ** -20
    torch.testing.assert_close(cpu_int4.decode(terms).t(), want, rtol=0, atol=atol)
    torch.testing.assert_close(cpu_int4.decode(terms, 64, 128).t(), want[64:], rtol=0, atol=atol)


def test_an_unknown_packing_keeps_the_int4_op(monkeypatch):
    """If this torch packs the codes in a layout decode does not read (the probe fails), many rows still go
    through the int4 op."""
    monkeypatch.setattr(cpu_int4, "_LAYOUT_KNOWN", None)
    monkeypatch.setattr(cpu_int4, "decode", lambda terms, *args: torch.zeros(64, 128))
    assert not cpu_int4.layout_known()
    blocks = _blocks(64, 256, "Q4_0", seed=1)
    layer = _int4_layer([(blocks, "Q4_0")], 256)
    layer.decoded_rows = cpu_int4.DEQUANTIZE_ROWS
    x = torch.randn(cpu_int4.DEQUANTIZE_ROWS, 256)
    weight = _reference(blocks, "Q4_0")
    err = (layer(x).double() - x.double() @ weight.double().t()).abs().max().item()
    assert err <= 3 * _bf16_error(x, weight)


def test_int4_layer_mixes_packed_decoded_and_float_parts():
    """Q4_K and Q8_0 parts packed, Q6_K (no 4-bit form) and a float part decoded into one float matrix, in order;
    a 3-d x and a bias."""
    torch.manual_seed(0)
    cols = 256
    parts = [(_blocks(32, cols, "Q4_K", 1), "Q4_K"), (_blocks(16, cols, "Q6_K", 2), "Q6_K"),
             (torch.randn(8, cols) * 0.05, None), (_blocks(32, cols, "Q8_0", 3), "Q8_0")]
    layer = _int4_layer(parts, cols, bias=True)
    assert layer.kinds == ["int4", "float", "int4"] and layer.qtypes == ["Q4_K", None, "Q8_0"]
    weight = torch.cat([_reference(b, q) if q else b for b, q in parts])
    x = torch.randn(2, 3, cols)
    got = layer(x)
    want = F.linear(x.double(), weight.double(), layer.bias.double())
    assert got.shape == (2, 3, 88)
    assert (got.double() - want).abs().max().item() <= 3 * _bf16_error(x.reshape(-1, cols), weight)


def test_a_part_the_op_cannot_tile_is_decoded_to_float():
    blocks = _blocks(40, 256, "Q4_0", seed=4)  # 40 rows: not a multiple of the op's 16
    layer = _int4_layer([(blocks, "Q4_0")], 256)
    assert layer.kinds == ["float"] and layer.qtypes == [None]
    x = torch.randn(3, 256)
    torch.testing.assert_close(layer(x), x @ _reference(blocks, "Q4_0").t(), rtol=1e-5, atol=1e-5)


def test_int4_form_keeps_the_bytes_of_a_4_bit_type():
    """Q4_1 is 20 bytes per 32 weights; the int4 form 16 bytes of codes and a bfloat16 scale and zero: the same."""
    blocks = _blocks(64, 512, "Q4_1", seed=0)
    layer = _int4_layer([(blocks, "Q4_1")], 512)
    held = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert held == blocks.numel()


def test_fast_here_follows_the_cpu_capability(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert cpu_int4.fast_here()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not cpu_int4.fast_here()


def test_finalize_rejects_an_unknown_form():
    layer = QuantLinear(256, 32, bias=False, dtype=torch.float32)
    layer.set_part(0, QuantizedTensor(_blocks(32, 256, "Q8_0", 0), "Q8_0", (32, 256)))
    with pytest.raises(ValueError, match="form must be one of"):
        layer.finalize("int8")
