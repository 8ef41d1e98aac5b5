"""The streaming one-row GEMV (braid_kernels/quant_stream.py) against the gguf package's decoder followed by a plain
float32 product with x rounded to int8 runs, as the integer-dot path is specified (test_quant.py's references)."""
from __future__ import annotations

import pytest
import torch

from braid_kernels.int8_rows import quantize_rows
from braid_kernels.quant import quant_linear, quant_linear_reference, uses_stream
from braid_kernels.quant_dot import dot_launch_config
from braid_kernels.quant_stream import STREAM_TYPES, launch_stream_gemv, stream_programs, stream_warps
from tests.kernels.common import assert_quant_close
from tests.kernels.test_quant import _int8_rows, _planes, _weights


@pytest.mark.parametrize("qtype", STREAM_TYPES)
@pytest.mark.parametrize("n, k", [(1, 512), (13, 1024), (70, 512), (5, 4096)])
def test_stream_is_the_int8_rounded_product(device, qtype, n, k):
    """Every row of W (one program's several rows, and the tail where a program has one row fewer) is x rounded to
    int8 runs times the gguf-decoded row, to bf16 rounding; the launch's programs do not change a bit."""
    _, blocks = _weights(n, k, seed=n + k, qtype=qtype)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(n)).to(torch.bfloat16)
    x[:, 32:64] = 0.0  # an all-zero run: scale 0
    want = quant_linear_reference(_int8_rows(x), blocks, qtype).to(torch.bfloat16)
    planes = _planes(blocks, qtype, device)
    rows = quantize_rows(x.to(device))
    outs = []
    for num_programs in (1, 3, 16):
        out = torch.full((1, n), float("nan"), dtype=torch.bfloat16, device=device)
        launch_stream_gemv(rows, planes, qtype, out, 1, num_programs=num_programs)
        assert_quant_close(out.cpu(), want, torch.bfloat16)
        outs.append(out.cpu())
    assert all(torch.equal(o, outs[0]) for o in outs)
    # the default path at one row streams, from x or from its int8 rows
    assert uses_stream(1, qtype, planes, None)
    assert torch.equal(quant_linear(x.to(device), planes, qtype).cpu(), outs[0])
    assert torch.equal(quant_linear(rows, planes, qtype).cpu(), outs[0])


def test_stream_is_taken_only_where_it_applies(device):
    """One row, Q4_K / Q6_K rows of whole words, no bias; otherwise (and with an explicit config) quant_dot's launch,
    which gives the same product to bf16 rounding."""
    _, blocks = _weights(9, 256, seed=1, qtype="Q6_K")  # 210-byte rows: not whole words
    planes = _planes(blocks, "Q6_K", device)
    assert not uses_stream(1, "Q6_K", planes, None)
    _, blocks = _weights(9, 512, seed=2, qtype="Q4_K")
    planes = _planes(blocks, "Q4_K", device)
    bias = torch.randn(9).to(torch.bfloat16).to(device)
    assert not uses_stream(2, "Q4_K", planes, None) and not uses_stream(1, "Q4_K", planes, bias)
    assert not uses_stream(1, "Q8_0", planes, None)
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16).to(device)
    streamed = quant_linear(x, planes, "Q4_K")
    launched = quant_linear(x, planes, "Q4_K", config=dot_launch_config("Q4_K", 1, 9, 1, 512))
    assert_quant_close(streamed.cpu(), launched.cpu(), torch.bfloat16)


def test_stream_launch_shape():
    """The swept launches: 2 warps for rows of 4096 (one for a 128256-row lm_head), 4 for rows of 14336; 16 programs
    per SM at K = 4096, 4 at 14336, never more programs than rows."""
    assert stream_warps("Q4_K", 4096, 4096) == 2 and stream_warps("Q6_K", 1024, 4096) == 2
    assert stream_warps("Q6_K", 128256, 4096) == 1
    assert stream_warps("Q4_K", 4096, 14336) == 4 and stream_warps("Q6_K", 4096, 14336) == 4
    assert stream_programs(28672, 4096, 132) == 132 * 16 and stream_programs(4096, 14336, 132) == 132 * 4
    assert stream_programs(100, 4096, 132) == 100
