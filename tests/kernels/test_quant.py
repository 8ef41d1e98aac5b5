"""The GGML-block kernels of braid_kernels/quant.py against the gguf package's decoder (gguf.quants.dequantize) followed by
plain float32 torch: the decoders bit for bit, the GEMV and GEMM to the rounding of their output dtype (the GEMM
paths also round the weights to x's dtype, which _gemm_reference does too).

Blocks come from tests/support/gguf_quant.py (gguf's own quantiser for Q8_0/Q4_0/Q4_1/Q5_0/Q5_1, a simple encoder
for the K-types); test_quantiser_round_trips checks those blocks hold the values they were made from."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from braid_kernels.quant import (
    BLOCK_SIZE,
    GEMM_DEFAULT_ROWS,
    GEMM_MIN_WEIGHTS,
    GEMV_DEFAULT_ROWS,
    HALF_BLOCK_ROWS,
    QTYPES,
    TYPE_SIZE,
    QuantGemmConfig,
    QuantGemvConfig,
    dequantize,
    dequantize_reference,
    dequantize_torch,
    linear_path,
    quant_embedding,
    quant_embedding_reference,
    quant_linear,
    quant_linear_reference,
    to_planes,
)
from braid_kernels.quant_planes import from_planes
from braid_kernels.quant_decode import GROUP_LANES, GROUPS_PER_BLOCK
from braid_kernels.quant_dot import dot_launch_config
from braid_kernels.quant_gemm import HALF_BLOCK, HALF_BLOCK_TYPES, X_FIRST_TYPES, group_launch_config, uses_half_block
from braid_kernels.quant_gemm import launch_config as gemm_launch_config
from braid_kernels.quant_gemv import MAX_ROWS, launch_config
from tests.kernels.common import assert_quant_close as _assert_close
from tests.kernels.common import assert_same_bits
from tests.support.gguf_quant import quantize

QTYPE_LIST = sorted(QTYPES)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Quantisation error of each type on N(0, 1) values, RMS: a bound a few times what the encoders give (Q8_0 0.005,
# Q4_* ~0.08, Q5_* 0.04, Q6_K 0.02), far below the 1.0 that garbage blocks would give.
ROUND_TRIP_RMS = {"Q8_0": 0.02, "Q4_0": 0.2, "Q4_1": 0.2, "Q5_0": 0.1, "Q5_1": 0.1, "Q4_K": 0.2, "Q5_K": 0.1,
                  "Q6_K": 0.05}


def _planes(blocks: torch.Tensor, qtype: str, device) -> torch.Tensor:
    """GGUF blocks as the kernels take them: in the planes layout, on `device`."""
    return to_planes(blocks, qtype).to(device)


def _weights(rows: int, cols: int, seed: int = 0, qtype: str = "Q4_K") -> tuple[np.ndarray, torch.Tensor]:
    """float32 weights [rows, cols] with per-row scale and offset differences, and their `qtype` blocks."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * rng.uniform(0.5, 2.0, (rows, 1)) + rng.uniform(-0.5, 0.5, (rows, 1)))
    w = w.astype(np.float32)
    return w, torch.from_numpy(quantize(w, qtype))




@pytest.mark.parametrize("qtype", QTYPE_LIST)
def test_quantiser_round_trips(qtype):
    w, blocks = _weights(6, 512, qtype=qtype)
    assert blocks.shape == (6, 512 // BLOCK_SIZE[qtype] * TYPE_SIZE[qtype])
    back = dequantize_reference(blocks, qtype).numpy()
    assert np.sqrt(np.mean((back - w) ** 2)) < ROUND_TRIP_RMS[qtype]


@pytest.mark.parametrize("qtype", QTYPE_LIST)
def test_torch_decoder_is_gguf_bit_for_bit(qtype):
    _, blocks = _weights(9, 1024, seed=1, qtype=qtype)
    want = dequantize_reference(blocks, qtype)
    got = dequantize_torch(blocks, qtype)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert torch.equal(dequantize_torch(blocks, qtype, torch.bfloat16), want.bfloat16())


@pytest.mark.parametrize("qtype", QTYPE_LIST)
def test_planes_regroup_each_rows_fields(qtype):
    """to_planes puts field f of block b of a row at the row's plane f, entry b (checked against the GGUF offsets
    written out by hand), and from_planes undoes it; rows stay where they were."""
    _, blocks = _weights(3, 768, seed=11, qtype=qtype)
    planes = to_planes(blocks, qtype)
    assert planes.shape == blocks.shape and torch.equal(from_planes(planes, qtype), blocks)
    fields = {"Q8_0": [(2, 32), (0, 2)], "Q4_0": [(2, 16), (0, 2)], "Q4_1": [(4, 16), (0, 4)],
              "Q5_0": [(6, 16), (2, 4), (0, 2)], "Q5_1": [(8, 16), (4, 4), (0, 4)],
              "Q4_K": [(16, 128), (4, 12), (0, 4)], "Q5_K": [(48, 128), (16, 32), (4, 12), (0, 4)],
              "Q6_K": [(0, 128), (128, 64), (192, 16), (208, 2)]}[qtype]
    size, nb = TYPE_SIZE[qtype], blocks.shape[1] // TYPE_SIZE[qtype]
    for row in range(3):
        start = 0
        for offset, width in fields:
            for b in range(nb):
                want = blocks[row, b * size + offset:b * size + offset + width]
                assert torch.equal(planes[row, start + b * width:start + (b + 1) * width], want)
            start += nb * width
        assert start == blocks.shape[1]
    with pytest.raises(ValueError, match="multiple of"):
        to_planes(blocks[:, :-1], qtype)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q6_K", "Q4_0", "Q5_0"])
def test_dot_gemv_rows_of_any_alignment(device, qtype):
    """Rows whose length is not a multiple of 4 bytes (Q8_0, Q4_0 and Q5_0 with an odd number of blocks, Q6_K with 1
    or 3 blocks) take the 16-bit loads (Q5_0's qh words too); rows of 2 or 4 blocks the word loads (Q5_0 at 2: 4- but
    not 16-byte aligned)."""
    for k in ((32 * 2, 32 * 3, 32 * 5, 32 * 8) if qtype != "Q6_K" else (256, 768, 1024)):
        _, blocks = _weights(5, k, seed=k, qtype=qtype)
        x = torch.randn(1, k, generator=torch.Generator().manual_seed(k)).to(torch.bfloat16)
        got = quant_linear(x.to(device), _planes(blocks, qtype, device), qtype, path="dot").cpu()
        _assert_close(got, quant_linear_reference(_int8_rows(x), blocks, qtype).to(torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("qtype", QTYPE_LIST)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequantize_is_gguf_rounded(device, qtype, out_dtype):
    _, blocks = _weights(5, 768, seed=2, qtype=qtype)  # rows and groups both ragged against the program tiles
    want = dequantize_reference(blocks, qtype, out_dtype)
    got = dequantize(_planes(blocks, qtype, device), qtype, out_dtype)
    assert torch.equal(got.cpu(), want)
    buffer = torch.full_like(got, float("nan"))
    assert dequantize(_planes(blocks, qtype, device), qtype, out_dtype, out=buffer) is buffer
    assert torch.equal(buffer.cpu(), want)


@pytest.mark.parametrize("qtype", QTYPE_LIST)
@pytest.mark.parametrize("num_rows", [1, 2, 3, 5, 8])
def test_gemv_matches_reference(device, qtype, num_rows):
    n, k = 13, 512  # odd N: the last program's rows are ragged
    _, blocks = _weights(n, k, seed=num_rows, qtype=qtype)
    x = torch.randn(num_rows, k, generator=torch.Generator().manual_seed(num_rows))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(7))
    for dtype in DTYPES:
        xd, bd = x.to(dtype), bias.to(dtype)
        want = quant_linear_reference(xd, blocks, qtype, bd)
        got = quant_linear(xd.to(device), _planes(blocks, qtype, device), qtype, bd.to(device), path="gemv")
        _assert_close(got.cpu(), want, dtype)
    want = quant_linear_reference(x, blocks, qtype)
    _assert_close(quant_linear(x.to(device), _planes(blocks, qtype, device), qtype, path="gemv").cpu(), want,
                  torch.float32)


def _int8_rows(x: torch.Tensor) -> torch.Tensor:
    """x rounded as llama.cpp's q8 activations: per run of 32 columns, 127 levels of the run's largest magnitude
    (rounded half away from zero), returned dequantised in float32."""
    runs = x.float().reshape(x.shape[0], -1, 32)
    amax = runs.abs().amax(dim=2, keepdim=True)
    scaled = runs * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)
    return (q * (amax / 127.0)).reshape(x.shape)


@pytest.mark.parametrize("qtype", QTYPE_LIST)
@pytest.mark.parametrize("num_rows", [1, 3, 8])
def test_dot_gemv_is_the_int8_rounded_product(device, qtype, num_rows):
    """16-bit x takes the integer-dot path (the default at M <= GEMV_DEFAULT_ROWS): W @ x with x rounded to int8 per 32 columns, to the output's
    rounding; and within the int8 rounding's error of the exact product."""
    n, k = 13, 512
    _, blocks = _weights(n, k, seed=10 + num_rows, qtype=qtype)
    x = torch.randn(num_rows, k, generator=torch.Generator().manual_seed(10 + num_rows))
    x[:, 64:96] = 0.0  # an all-zero run of 32: scale 0
    bias = torch.randn(n, generator=torch.Generator().manual_seed(8))
    if num_rows <= GEMV_DEFAULT_ROWS:
        assert linear_path(num_rows, torch.bfloat16) == "dot" and linear_path(num_rows, torch.float32) == "gemv"
    for dtype in (torch.bfloat16, torch.float16):
        xd, bd = x.to(dtype), bias.to(dtype)
        got = quant_linear(xd.to(device), _planes(blocks, qtype, device), qtype, bd.to(device), path="dot").cpu()
        rounded = quant_linear_reference(_int8_rows(xd), blocks, qtype, bd.float()).to(dtype)
        _assert_close(got, rounded, dtype)
        exact = quant_linear_reference(xd, blocks, qtype, bd).float()
        rel = ((got.float() - exact).norm() / exact.norm()).item()
        assert rel < 0.02, f"int8 rounding moved the product by {rel:.3g} of its norm"


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q8_0", "Q5_K"])
@pytest.mark.parametrize("config", [QuantGemvConfig(1, 64, 4), QuantGemvConfig(8, 4096, 8),
                                    QuantGemvConfig(2, 64, 4, split_k=3)])
def test_dot_gemv_configs(device, qtype, config):
    _, blocks = _weights(7, 768, seed=3, qtype=qtype)
    x = torch.randn(2, 768, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    bias = torch.randn(7, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    got = quant_linear(x.to(device), _planes(blocks, qtype, device), qtype, bias.to(device), config=config, path="dot")
    _assert_close(got.cpu(), quant_linear_reference(_int8_rows(x), blocks, qtype, bias.float()).to(torch.bfloat16),
                  torch.bfloat16)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q8_0"])
@pytest.mark.parametrize("config", [QuantGemvConfig(1, 64, 4), QuantGemvConfig(4, 256, 4), QuantGemvConfig(8, 4096, 8),
                                    QuantGemvConfig(2, 64, 4, split_k=3), QuantGemvConfig(1, 256, 4, split_k=2)])
def test_gemv_configs(device, qtype, config):
    """Tiles of one group to more than the whole row, one row of W per program to more than N, K split into
    slices (of uneven numbers of steps)."""
    _, blocks = _weights(7, 768, seed=3, qtype=qtype)
    x = torch.randn(2, 768, generator=torch.Generator().manual_seed(3))
    bias = torch.randn(7, generator=torch.Generator().manual_seed(4))
    _assert_close(quant_linear(x.to(device), _planes(blocks, qtype, device), qtype, bias.to(device),
                               config=config).cpu(),
                  quant_linear_reference(x, blocks, qtype, bias), torch.float32)
    x = x.to(torch.bfloat16)
    _assert_close(quant_linear(x.to(device), _planes(blocks, qtype, device), qtype, config=config, path="gemv").cpu(),
                  quant_linear_reference(x, blocks, qtype), torch.bfloat16)


def test_launch_config_keeps_programs_and_registers_in_bounds():
    """At least 4 programs per SM down to one weight row per program; the accumulator (rows x block_n x block_k / 2
    float32 values over the threads) no larger at 8 rows than at 1; a tile of at least one group."""
    for qtype in QTYPE_LIST:
        for n in (1024, 4096, 12288, 151936):
            for num_rows in range(1, MAX_ROWS + 1):
                config = launch_config(qtype, num_rows, n, num_sms=132)
                assert config.block_n == 1 or -(-n // config.block_n) >= 4 * 132
                block_m = 1 << (num_rows - 1).bit_length()
                assert block_m * config.block_n * config.block_k <= 4 * 4096
                assert config.block_k >= 2 * GROUP_LANES[qtype]
    assert launch_config("Q4_K", 1, 4096, 132).block_n == 4
    assert launch_config("Q4_K", 1, 1024, 132, k=4096) == launch_config("Q4_K", 1, 1024, 132)  # 1024 programs
    narrow = launch_config("Q4_K", 1, 64, 132, k=4096)
    assert narrow.block_n == 1 and narrow.split_k > 1 and narrow.block_k * narrow.split_k >= 4096


def test_gemv_strided_rows(device):
    _, blocks = _weights(8, 256, seed=4)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(4))[:, :256]
    _assert_close(quant_linear(x.to(device), _planes(blocks, "Q4_K", device), "Q4_K").cpu(),
                  quant_linear_reference(x, blocks, "Q4_K"), torch.float32)


def _gemm_reference(x: torch.Tensor, blocks: torch.Tensor, qtype: str, bias: torch.Tensor | None = None):
    """The GEMM paths' rounding: gguf's weights rounded to x's dtype, then a float32 matmul rounded to x's dtype."""
    w = dequantize_reference(blocks, qtype).to(x.dtype).float()
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


@pytest.mark.parametrize("qtype", QTYPE_LIST)
@pytest.mark.parametrize("num_rows", [9, 16, 33, 130])
def test_gemm_matches_reference(device, qtype, num_rows):
    """The fused GEMM (path="gemm") against gguf's decoder; N = 24 leaves most of a BLOCK_N tile
    out, and 130 rows a ragged BLOCK_M tile."""
    n, k = 24, 512
    _, blocks = _weights(n, k, seed=5, qtype=qtype)
    x = torch.randn(num_rows, k, generator=torch.Generator().manual_seed(5))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(6))
    assert linear_path(num_rows) == "dequantize"
    for dtype in (torch.float32, torch.bfloat16):
        xd, bd = x.to(dtype), bias.to(dtype)
        _assert_close(quant_linear(xd.to(device), _planes(blocks, qtype, device), qtype, bd.to(device),
                                   path="gemm").cpu(),
                      _gemm_reference(xd, blocks, qtype, bd), dtype)


@pytest.mark.parametrize("qtype", QTYPE_LIST)
@pytest.mark.parametrize("config", [QuantGemmConfig(16, 16, 4, 1), QuantGemmConfig(32, 64, 4, 2),
                                    QuantGemmConfig(64, 32, 8, 3, split_k=2),
                                    QuantGemmConfig(16, 16, 4, 1, split_k=5)])
def test_gemm_configs(device, qtype, config):
    """Tiles narrower and wider than N and M, K split into two and five slices (of uneven numbers of group steps),
    and M <= MAX_ROWS through the GEMM (BLOCK_M padding); float16 x too."""
    n, k = 40, 768
    _, blocks = _weights(n, k, seed=9, qtype=qtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(9))
    for num_rows, dtype in ((3, torch.bfloat16), (21, torch.float16), (24, torch.float32)):
        x = torch.randn(num_rows, k, generator=torch.Generator().manual_seed(num_rows)).to(dtype)
        got = quant_linear(x.to(device), _planes(blocks, qtype, device), qtype, bias.to(dtype).to(device),
                           config=config, path="gemm")
        _assert_close(got.cpu(), _gemm_reference(x, blocks, qtype, bias.to(dtype)), dtype)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_half_block_gemm_slices(device, qtype):
    """The half-block kernels on K = 1024 (8 steps of 128 columns) split into 3 slices (3, 3 and 2 steps: a slice
    starts on an odd step, the second half of a block, whose scales the kernel loads before its loop), with a bias,
    a ragged N and float16 and bfloat16 x, with the weights or x as the tensor-core product's first operand."""
    n, k = 70, 1024
    _, blocks = _weights(n, k, seed=13, qtype=qtype)
    planes = _planes(blocks, qtype, device)
    assert uses_half_block(qtype, planes.shape[1], torch.bfloat16)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(13))
    for num_rows, dtype, config in ((21, torch.float16, QuantGemmConfig(64, 32, 4, 3, split_k=3)),
                                    (9, torch.bfloat16, QuantGemmConfig(32, 16, 4, 2, split_k=3)),
                                    (9, torch.bfloat16, QuantGemmConfig(64, 16, 4, 4, split_k=1)),
                                    # Q4_K, x as the first operand: a ragged second tile of rows, 3 and 2 slices
                                    (70, torch.bfloat16, QuantGemmConfig(64, 64, 4, 3, split_k=3, x_first=True)),
                                    (21, torch.float16, QuantGemmConfig(32, 16, 4, 2, split_k=2, x_first=True))):
        if config.x_first and qtype not in X_FIRST_TYPES:
            with pytest.raises(ValueError, match="x_first takes the half-block kernel of Q4_K"):
                quant_linear(torch.zeros(num_rows, k, dtype=dtype, device=device), planes, qtype, config=config,
                             path="gemm")
            continue
        x = torch.randn(num_rows, k, generator=torch.Generator().manual_seed(num_rows)).to(dtype)
        got = quant_linear(x.to(device), planes, qtype, bias.to(dtype).to(device), config=config, path="gemm")
        _assert_close(got.cpu(), _gemm_reference(x, blocks, qtype, bias.to(dtype)), dtype)


def test_gemm_strided_rows_and_paths(device):
    _, blocks = _weights(8, 256, seed=4)
    x = torch.randn(12, 512, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)[:, :256]
    want = _gemm_reference(x, blocks, "Q4_K")
    for path in ("gemm", "dequantize"):
        _assert_close(quant_linear(x.to(device), _planes(blocks, "Q4_K", device), "Q4_K", path=path).cpu(), want,
                      torch.bfloat16)
    assert [linear_path(m) for m in (1, GEMV_DEFAULT_ROWS, GEMV_DEFAULT_ROWS + 1, MAX_ROWS + 1, 4096)] == [
        "dot", "dot", "dequantize", "dequantize", "dequantize"]
    assert [linear_path(m, torch.float32) for m in (1, GEMV_DEFAULT_ROWS, MAX_ROWS)] == ["gemv", "gemv", "dequantize"]
    large = GEMM_MIN_WEIGHTS
    assert [linear_path(m, torch.bfloat16, large) for m in (GEMV_DEFAULT_ROWS, GEMV_DEFAULT_ROWS + 1,
                                                            GEMM_DEFAULT_ROWS, GEMM_DEFAULT_ROWS + 1)] == [
        "dot", "gemm", "gemm", "dequantize"]
    assert linear_path(16, torch.float16, large) == "gemm" and linear_path(16, torch.float32, large) == "dequantize"
    assert linear_path(16, torch.bfloat16, large - 1) == "dequantize"
    # the half-block GEMM kernels (Q4_K, Q6_K) are the default from 5 to 128 rows of 16-bit x on a matrix of any size
    for qtype in ("Q4_K", "Q6_K"):
        assert [linear_path(m, torch.bfloat16, 256 * 256, qtype) for m in (4, 5, 65, HALF_BLOCK_ROWS,
                                                                            HALF_BLOCK_ROWS + 1)] == [
            "dot", "gemm", "gemm", "gemm", "dequantize"]
        assert linear_path(16, torch.float32, 256 * 256, qtype) == "dequantize"
    assert linear_path(16, torch.bfloat16, 256 * 256, "Q8_0") == "dequantize"
    # a Q6_K matrix of an odd number of blocks per row (not 4-byte aligned) keeps the group kernel's rule
    assert not uses_half_block("Q6_K", 3 * TYPE_SIZE["Q6_K"], torch.bfloat16)
    assert uses_half_block("Q4_K", 3 * TYPE_SIZE["Q4_K"], torch.bfloat16)
    assert not uses_half_block("Q4_K", 2 * TYPE_SIZE["Q4_K"], torch.float32)


def test_gemm_launch_config_fits_the_tensor_cores():
    """BLOCK_M a power of two from 16 (one MMA N side) that wastes at most half its rows when M > 16; K slices only
    while the programs are fewer than the SMs, each slice keeping at least 16 group steps (Q4_K, Q6_K: fewer than two
    programs per SM, slices of at least 4 steps of HALF_BLOCK columns)."""
    for qtype in QTYPE_LIST:
        for num_rows in (1, 9, 16, 17, 33, 64, 100, 256, 1000, 5000):
            for n, k in ((128, 4096), (1024, 4096), (4096, 4096), (4096, 14336), (151936, 4096)):
                config = gemm_launch_config(qtype, num_rows, n, num_sms=132, k=k)
                assert config.block_m >= 16 and config.block_m & (config.block_m - 1) == 0
                assert num_rows <= 16 or config.block_m < 2 * num_rows
                programs = -(-n // config.block_n) * -(-num_rows // config.block_m)
                if qtype in HALF_BLOCK_TYPES:  # steps of HALF_BLOCK columns, up to two programs per SM
                    steps, min_steps, per_sm = k // HALF_BLOCK, 4, 2
                    assert config.block_n == 64 and config.block_m <= 128
                else:  # group steps along K
                    steps, min_steps, per_sm = k // BLOCK_SIZE[qtype] * GROUPS_PER_BLOCK[qtype], 16, 1
                assert config.split_k == 1 or programs * config.split_k // 2 < per_sm * 132
                assert steps // config.split_k >= min_steps
                assert config.split_k > 1 or programs >= per_sm * 132 or steps < 2 * min_steps
    # tiles of 64 rows of x take x as the first operand, over 3 stages; others the weights, 4 stages up to 64 rows
    assert gemm_launch_config("Q4_K", 64, 28672, k=4096) == (64, 64, 4, 3, 1, True)
    assert gemm_launch_config("Q4_K", 16, 4096, k=14336) == (64, 16, 4, 4, 8, False)
    assert gemm_launch_config("Q4_K", 32, 4096, k=14336) == (64, 32, 4, 4, 8, False)
    assert gemm_launch_config("Q6_K", 64, 4096, k=14336) == (64, 64, 4, 4, 8, False)  # not in X_FIRST_TYPES
    assert gemm_launch_config("Q8_0", 64, 4096, k=14336)[:4] == (128, 64, 8, 3)
    assert gemm_launch_config("Q4_K", 100, 28672, k=4096) == (64, 128, 4, 3, 1, False)
    assert gemm_launch_config("Q5_K", 256, 28672, k=4096)[:4] == (128, 128, 8, 3)
    assert group_launch_config("Q4_K", 64, 28672, k=4096)[:4] == (64, 64, 4, 3)  # Q4_K / Q6_K of float32 x


def test_dot_launch_config_follows_the_sweep():
    """One row of W per program at one row of x, 4 warps (one for the K-types at one row, but for Q6_K matrices of
    at most 8192 rows), and steps of at least 2048 weights up to 4 rows of x unless K is split (narrow N); 5-8 rows
    keep the float GEMV's steps."""
    for qtype in QTYPE_LIST:
        for n, k in ((128, 4096), (1024, 4096), (6144, 4096), (28672, 4096), (4096, 14336)):
            for num_rows in (1, 2, 3, 4, 8):
                config = dot_launch_config(qtype, num_rows, n, 132, k)
                base = launch_config(qtype, num_rows, n, 132, k)
                one_warp = num_rows == 1 and qtype in ("Q4_K", "Q5_K", "Q6_K") and not (qtype == "Q6_K" and n <= 8192)
                assert config.num_warps == (1 if one_warp else 4) and config.split_k == base.split_k
                assert config.block_n == (1 if num_rows == 1 else base.block_n)
                if num_rows <= 4 and config.split_k == 1:
                    assert config.block_k == max(base.block_k, 2048)
                else:
                    assert config.block_k == base.block_k


@pytest.mark.parametrize("qtype", QTYPE_LIST)
def test_embedding_is_gguf_rounded(device, qtype):
    _, blocks = _weights(11, 512, seed=8, qtype=qtype)
    ids = torch.tensor([10, 0, 3, 3, 7])
    for id_dtype, out_dtype in ((torch.int64, torch.bfloat16), (torch.int32, torch.float32)):
        want = quant_embedding_reference(ids, blocks, qtype, out_dtype)
        got = quant_embedding(ids.to(id_dtype).to(device), _planes(blocks, qtype, device), qtype, out_dtype)
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("path", ["dot", "gemv", "gemm", "dequantize", "int8"])
def test_linear_writes_into_out(device, path):
    """`out=`: each path (and x given as int8 rows) writes the bits it returns without out into the given tensor,
    here one part's columns of a one-row output (contiguous) and a whole [M, N] output, and returns that tensor;
    the columns around the part are left as they were."""
    from braid_kernels import quantize_rows

    n, k = 24, 512
    _, blocks = _weights(n, k, seed=8)
    blocks = _planes(blocks, "Q4_K", device)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16).to(device)
    for num_rows in (1, 3):
        x = torch.randn(num_rows, k, generator=torch.Generator().manual_seed(num_rows)).to(torch.bfloat16).to(device)
        arg, kwargs = (quantize_rows(x), {}) if path == "int8" else (x, {"path": path})
        want = quant_linear(arg, blocks, "Q4_K", bias, **kwargs)
        whole = torch.full((num_rows, n), 7.0, dtype=torch.bfloat16, device=device)
        assert quant_linear(arg, blocks, "Q4_K", bias, out=whole, **kwargs) is whole
        assert_same_bits(whole.cpu(), want.cpu())
        for config in ((QuantGemmConfig(32, 16, 4, 2, split_k=3),) if path == "gemm" else ()):
            # K split into float32 partials summed into out, and (Q4_K) x as the first operand
            for config in (config, config._replace(block_n=64, block_m=64, num_stages=3, x_first=True)):
                want_config = quant_linear(arg, blocks, "Q4_K", bias, config=config, **kwargs)
                whole = torch.full((num_rows, n), 7.0, dtype=torch.bfloat16, device=device)
                assert quant_linear(arg, blocks, "Q4_K", bias, config=config, out=whole, **kwargs) is whole
                assert_same_bits(whole.cpu(), want_config.cpu())
        if num_rows == 1:
            wide = torch.full((1, n + 40), 7.0, dtype=torch.bfloat16, device=device)
            got = quant_linear(arg, blocks, "Q4_K", bias, out=wide[:, 8:8 + n], **kwargs)
            assert got.data_ptr() == wide[:, 8:].data_ptr()
            assert_same_bits(wide[:, 8:8 + n].cpu(), want.cpu())
            assert bool((wide[:, :8] == 7).all()) and bool((wide[:, 8 + n:] == 7).all())


def test_empty_inputs(device):
    _, blocks = _weights(4, 256)
    blocks = _planes(blocks, "Q4_K", device)
    assert quant_linear(torch.empty(0, 256, device=device), blocks, "Q4_K").shape == (0, 4)
    assert quant_embedding(torch.empty(0, dtype=torch.int64, device=device), blocks, "Q4_K").shape == (0, 256)
    assert dequantize(blocks[:0], "Q4_K").shape == (0, 256)
    # K = 0: every path gives the bias (a sum of nothing)
    no_k = torch.empty(4, 0, dtype=torch.uint8, device=device)
    bias = torch.arange(4, dtype=torch.float32, device=device)
    for path in ("dot", "gemv", "gemm", "dequantize"):
        x = torch.empty(3, 0, device=device, dtype=torch.bfloat16 if path == "dot" else torch.float32)
        got = quant_linear(x, no_k, "Q4_K", bias.to(x.dtype), path=path)
        assert torch.equal(got.float().cpu(), bias.cpu().expand(3, 4)), path


def _bad_calls(device="cpu"):
    """(call, message) pairs on `device`'s tensors (on a CUDA machine CPU tensors would fail the device check first)."""
    _, blocks = _weights(4, 256)
    blocks = blocks.to(device)
    x = torch.randn(1, 256).to(device)
    ids = torch.tensor([0, 1], device=device)

    def empty(*shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device=device)

    shared = torch.zeros(1, 512, device=device)  # x, bias and out as views of one buffer

    return [
        (lambda: quant_linear(x, blocks, "Q2_K"), "qtype must be one of"),
        (lambda: quant_linear(x, blocks.view(torch.int8), "Q4_K"), "blocks must have dtype uint8"),
        (lambda: quant_linear(x, blocks[:, :100], "Q4_K"), "multiple of 144 bytes"),
        (lambda: quant_linear(x, blocks.t().contiguous().t(), "Q4_K"), "blocks must be contiguous"),
        (lambda: quant_linear(x, torch.cat((blocks.new_zeros(2), blocks.flatten()))[2:].view(4, -1), "Q4_K"),
         "4-byte aligned"),
        (lambda: quant_linear(torch.randn(1, 512, device=device), blocks, "Q4_K"), "x must have 256 columns"),
        (lambda: quant_linear(x.to(torch.int32), blocks, "Q4_K"), "x must have dtype"),
        (lambda: quant_linear(x[0], blocks, "Q4_K"), "x must be 2-dimensional"),
        (lambda: quant_linear(x, blocks, "Q4_K", bias=torch.zeros(5, device=device)), "bias must have shape"),
        (lambda: quant_linear(x, blocks, "Q4_K", path="cublas"), "path must be one of"),
        (lambda: quant_linear(torch.randn(9, 256, device=device), blocks, "Q4_K", path="gemv"),
         "gemv for at most 8 rows"),
        (lambda: quant_linear(x, blocks, "Q4_K", bias=torch.zeros(4, dtype=torch.bfloat16, device=device)),
         "bias must have"),
        (lambda: quant_embedding(ids.float(), blocks, "Q4_K"), "ids must have dtype"),
        (lambda: quant_embedding(ids, blocks, "Q4_K", torch.int8), "out_dtype must be one of"),
        (lambda: dequantize(blocks, "Q8_0"), "multiple of 34 bytes"),
        (lambda: dequantize(blocks, "Q4_K", out=empty(4, 255, dtype=torch.bfloat16)), "out must have shape"),
        (lambda: quant_linear(x, blocks, "Q4_K", out=empty(1, 5)), "out must have shape"),
        (lambda: quant_linear(x, blocks, "Q4_K", out=empty(1, 4, dtype=torch.bfloat16)), "out must have dtype"),
        (lambda: quant_linear(torch.randn(2, 256, device=device), blocks, "Q4_K", out=empty(4, 2).t()),
         "out must be contiguous"),
        (lambda: quant_linear(shared[:, :256], blocks, "Q4_K", out=shared[:, 252:256]), "out must not overlap x"),
        (lambda: quant_linear(x, blocks, "Q4_K", bias=shared[0, :4], out=shared[:, 2:6]), "out must not overlap bias"),
        (lambda: quant_linear(torch.randn(9, 256, device=device), blocks, "Q4_K",
                              config=QuantGemmConfig(64, 16, 4, 2, x_first=True), path="gemm"),
         "x_first takes the half-block kernel of Q4_K"),  # float32 x
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_arguments_are_value_errors(device, index):
    call, message = _bad_calls(device)[index]
    with pytest.raises(ValueError, match=message):
        call()
