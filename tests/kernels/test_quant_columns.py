"""The column layout of GGML blocks (braid_kernels/quant_columns.py) against the gguf package's decoder followed by plain
float32 torch: the layout round-trips to the file's bytes, its dequantiser gives gguf's values bit for bit, its
GEMV the float32 product to the output's rounding (M <= 8) and its dequantise + matmul path likewise above."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from braid_kernels.quant import dequantize_reference, quant_linear_reference
from braid_kernels.quant_columns import (
    COLUMN_QTYPES,
    MAX_ROWS,
    WORDS,
    ColumnsConfig,
    columns_linear,
    dequantize_columns,
    launch_config,
    pack_columns,
    unpack_columns,
)
from braid_kernels.quant_formats import TYPE_SIZE
from tests.kernels.common import assert_quant_close as _assert_close
from tests.support.gguf_quant import quantize

QTYPES = sorted(COLUMN_QTYPES)


def _blocks(rows: int, cols: int, qtype: str, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)) * rng.uniform(0.5, 2.0, (rows, 1)) + rng.uniform(-0.5, 0.5, (rows, 1))
    return torch.from_numpy(quantize(w.astype(np.float32), qtype))




@pytest.mark.parametrize("qtype", QTYPES)
def test_layout_round_trips_and_keeps_the_size(qtype):
    blocks = _blocks(6, 512, qtype)
    words = pack_columns(blocks, qtype)
    assert words.dtype == torch.int32 and words.shape == (512 // (32 if qtype == "Q8_0" else 256) * WORDS[qtype], 6)
    assert torch.equal(unpack_columns(words, qtype), blocks)
    assert words.numel() * 4 <= blocks.numel() * (36 / 34 if qtype == "Q8_0" else 212 / 210)
    # word w of column n is bytes 4w.. of row n's blocks, padded: check one word by hand
    row = blocks[2].reshape(-1, TYPE_SIZE[qtype])[1]
    first_code_word = {"Q8_0": (1, 2), "Q4_K": (4, 16), "Q6_K": (0, 0)}[qtype]
    word, byte = first_code_word
    expected = int.from_bytes(bytes(row[byte:byte + 4].tolist()), "little", signed=True)
    assert words[WORDS[qtype] + word, 2].item() == expected


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_gguf_rounded(device, qtype, out_dtype):
    blocks = _blocks(131, 768 if qtype != "Q8_0" else 800, qtype, seed=1)  # 131 columns: a ragged column tile
    got = dequantize_columns(pack_columns(blocks, qtype).to(device), qtype, out_dtype).cpu()
    assert torch.equal(got.t(), dequantize_reference(blocks, qtype, out_dtype))


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("num_rows", [1, 2, 3, 8])
def test_gemv_matches_reference(device, qtype, num_rows):
    n, k = 133, 768 if qtype != "Q8_0" else 800  # Q8_0: a last step of 3 blocks out of 8
    blocks = _blocks(n, k, qtype, seed=num_rows)
    words = pack_columns(blocks, qtype).to(device)
    x = torch.randn(num_rows, k, generator=torch.Generator().manual_seed(num_rows))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(7))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xd, bd = x.to(dtype), bias.to(dtype)
        _assert_close(columns_linear(xd.to(device), words, qtype, bd.to(device)).cpu(),
                      quant_linear_reference(xd, blocks, qtype, bd), dtype)
    _assert_close(columns_linear(x.to(device), words, qtype).cpu(), quant_linear_reference(x, blocks, qtype),
                  torch.float32)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("config", [ColumnsConfig(1, 1), ColumnsConfig(2, 2, 8), ColumnsConfig(1, 3, 8),
                                    ColumnsConfig(4, 64)])
def test_gemv_configs(device, qtype, config):
    """One slice, K split evenly, unevenly and into more slices than steps; 128 to 512 columns per program, 4 or 8
    per thread."""
    blocks = _blocks(200, 768, qtype, seed=3)
    x = torch.randn(2, 768, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    bias = torch.randn(200, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    got = columns_linear(x.to(device), pack_columns(blocks, qtype).to(device), qtype, bias.to(device), config=config)
    _assert_close(got.cpu(), quant_linear_reference(x, blocks, qtype, bias), torch.bfloat16)


def test_launch_config_fills_the_gpu():
    for n in (1024, 4096, 28672, 128256):
        for k in (4096, 14336):
            config = launch_config(1, n, k, num_sms=132)
            programs = -(-n // config.block_n) * config.split_k
            assert config.split_k <= -(-k // 256)
            assert programs * config.num_warps >= min(8 * 132, -(-n // config.block_n) * -(-k // 256))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0"])
def test_many_rows_dequantise_and_multiply(device, qtype):
    """Above MAX_ROWS: W.T dequantised to x's dtype, then a matmul in it."""
    blocks = _blocks(40, 512, qtype, seed=5)
    x = torch.randn(MAX_ROWS + 3, 512, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    got = columns_linear(x.to(device), pack_columns(blocks, qtype).to(device), qtype).cpu()
    w = dequantize_reference(blocks, qtype).to(torch.bfloat16).float()
    _assert_close(got, F.linear(x.float(), w).to(torch.bfloat16), torch.bfloat16)


def test_bad_arguments_are_value_errors(device):
    blocks = _blocks(4, 256, "Q4_K")
    words = pack_columns(blocks, "Q4_K").to(device)
    x = torch.randn(1, 256, device=device)
    with pytest.raises(ValueError, match="qtype"):
        pack_columns(blocks, "Q5_K")
    with pytest.raises(ValueError, match="columns"):
        columns_linear(torch.randn(1, 512, device=device), words, "Q4_K")
    with pytest.raises(ValueError, match="words"):
        columns_linear(x, words[:-1], "Q4_K")
    with pytest.raises(ValueError, match="bias"):
        columns_linear(x, words, "Q4_K", torch.randn(5, device=device))
    with pytest.raises(ValueError, match="blocks"):
        pack_columns(blocks[:, :100], "Q4_K")

