"""The streaming one-row GEMV (braid_kernels/quant_stream.py) against the gguf package's decoder followed by a plain
float32 product with x rounded to int8 runs, as the integer-dot path is specified (test_quant.py's references)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from braid_kernels.int8_rows import quantize_rows
from braid_kernels.quant import quant_linear, quant_linear_pair, quant_linear_reference
from braid_kernels.quant_decode import GROUP_LANES, GROUPS_PER_BLOCK, QTYPE_IDS, num_groups
from braid_kernels.quant_formats import TYPE_SIZE
from braid_kernels.quant_stream import (
    STREAM_MAX_K,
    STREAM_MIN_ROWS,
    STREAM_TYPES,
    _first_row,
    launch_stream_gemv,
    launch_stream_gemv_pair,
    programs_that_fit,
    stream_programs,
    stream_warps,
    uses_stream,
)
from tests.kernels.common import assert_quant_close
from tests.kernels.test_quant import _int8_rows, _planes, _weights

FP16_FIELDS = {"Q4_K": (0, 2), "Q6_K": (208,)}  # byte offsets of d (and dmin) in a GGUF block


def _random_blocks(qtype: str, n: int, k: int, seed: int) -> torch.Tensor:
    """GGUF blocks of random bytes (every packing of the 6-bit scales and mins, negative Q6_K scales, every qh
    pattern) with fp16 d / dmin drawn from [0.001, 0.01]: [n, k / 256 * TYPE_SIZE] uint8."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n * k // 256, TYPE_SIZE[qtype]), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        blocks[:, offset:offset + 2] = rng.uniform(0.001, 0.01, (blocks.shape[0], 1)).astype(np.float16).view(np.uint8)
    return torch.from_numpy(blocks.reshape(n, -1))


@pytest.mark.parametrize("qtype", STREAM_TYPES)
@pytest.mark.parametrize("n, k, blocks_from", [(1, 512, "encoder"), (13, 1024, "encoder"), (70, 512, "encoder"),
                                               (5, 4096, "encoder"), (21, 1536, "random bytes"),
                                               (9, 2560, "random bytes")])
def test_stream_is_the_int8_rounded_product(device, qtype, n, k, blocks_from):
    """Every row of W (one program's several rows, and the tail where a program has one row fewer) is x rounded to
    int8 runs times the gguf-decoded row, to bf16 rounding; the launch's programs do not change a bit. Blocks from
    the test encoder or of random bytes (negative Q6_K scales, all scale packings); K of a power of two of groups or
    not (1536, 2560: the tile's last groups masked)."""
    if blocks_from == "encoder":
        _, blocks = _weights(n, k, seed=n + k, qtype=qtype)
    else:
        blocks = _random_blocks(qtype, n, k, seed=n + k)
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


@pytest.mark.parametrize("qtype", STREAM_TYPES)
def test_default_path_streams_the_measured_shapes(device, qtype, monkeypatch):
    """quant_linear's default at one row of x streams a matrix of STREAM_MIN_ROWS rows (lowered here to keep the
    interpreted test short), from x or from its int8 rows, giving the reference product."""
    import braid_kernels.quant_stream as quant_stream

    monkeypatch.setattr(quant_stream, "STREAM_MIN_ROWS", 24)
    n, k = 24, 512
    blocks = _random_blocks(qtype, n, k, seed=4)
    planes = _planes(blocks, qtype, device)
    assert uses_stream(1, qtype, planes, None)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    rows = quantize_rows(x.to(device))
    streamed = torch.empty((1, n), dtype=torch.bfloat16, device=device)
    launch_stream_gemv(rows, planes, qtype, streamed, 1)
    assert_quant_close(streamed.cpu(), quant_linear_reference(_int8_rows(x), blocks, qtype).to(torch.bfloat16),
                       torch.bfloat16)
    assert torch.equal(quant_linear(x.to(device), planes, qtype), streamed)
    assert torch.equal(quant_linear(rows, planes, qtype), streamed)


@pytest.mark.parametrize("a_qtype, b_qtype, na, nb, k", [("Q4_K", "Q6_K", 20, 7, 512), ("Q6_K", "Q4_K", 5, 9, 1536),
                                                         ("Q4_K", "Q4_K", 3, 30, 1024)])
def test_pair_is_the_two_launches(device, a_qtype, b_qtype, na, nb, k):
    """One launch over two matrices (launch_stream_gemv_pair) writes exactly what a launch over each writes into its
    own columns, for any number of programs (the fewest: one per matrix), and matches the reference; a program
    streaming rows of the wrong matrix, or an output written at the wrong offset, fails it."""
    a, b = _random_blocks(a_qtype, na, k, seed=na), _random_blocks(b_qtype, nb, k, seed=nb)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(k)).to(torch.bfloat16)
    rows = quantize_rows(x.to(device))
    pa, pb = _planes(a, a_qtype, device), _planes(b, b_qtype, device)
    want = torch.empty((1, na + nb), dtype=torch.bfloat16, device=device)
    launch_stream_gemv(rows, pa, a_qtype, want[:, :na], 1, num_programs=3)
    launch_stream_gemv(rows, pb, b_qtype, want[:, na:], 1, num_programs=3)
    reference = torch.cat([quant_linear_reference(_int8_rows(x), blocks, qtype)
                           for blocks, qtype in ((a, a_qtype), (b, b_qtype))], dim=1).to(torch.bfloat16)
    assert_quant_close(want.cpu(), reference, torch.bfloat16)
    for num_programs in (2, 5, 64):
        out = torch.full((1, na + nb), float("nan"), dtype=torch.bfloat16, device=device)
        launch_stream_gemv_pair(rows, pa, a_qtype, pb, b_qtype, out, 1, num_programs=num_programs)
        assert torch.equal(out, want)


def test_two_part_projection_streams_both_in_one_launch(device, monkeypatch):
    """A QuantLinear of a Q4_K part and a Q6_K part (a layer's q/k and v) takes one pair launch for one row of x (its
    int8 rows made once), writing what the two parts' own launches write; with more rows, no pair launch."""
    import braid_kernels.quant as quant
    import braid_kernels.quant_stream as quant_stream
    import braidinfer.layers.quant_linear as quant_linear_module
    from braidinfer.layers.quant_linear import QuantLinear
    from braidinfer.loader.quantized import QuantizedTensor

    monkeypatch.setattr(quant_stream, "STREAM_MIN_ROWS", 8)
    # one row takes int8 rows, as on CUDA (where the interpreter runs, on the CPU, x would stay 16-bit)
    monkeypatch.setattr(quant_linear_module, "int8_input_rows", lambda rows, dtype, device: rows == 1)
    k = 512
    a, b = _random_blocks("Q4_K", 12, k, seed=1), _random_blocks("Q6_K", 8, k, seed=2)
    layer = QuantLinear(k, 20, bias=False, dtype=torch.bfloat16)
    layer.set_part(0, QuantizedTensor(a, "Q4_K", (12, k)))
    layer.set_part(12, QuantizedTensor(b, "Q6_K", (8, k)))
    layer.finalize("blocks")
    layer.to(device)
    pairs = []
    launch = quant.launch_stream_gemv_pair
    monkeypatch.setattr(quant, "launch_stream_gemv_pair", lambda *args: pairs.append(1) or launch(*args))
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16).to(device)
    y = layer(x[:1])
    assert len(pairs) == 1
    rows = quantize_rows(x[:1])
    want = torch.cat([quant_linear(rows, _planes(blocks, qtype, device), qtype)
                      for blocks, qtype in ((a, "Q4_K"), (b, "Q6_K"))], dim=1)
    assert torch.equal(y, want)
    layer(x)
    assert len(pairs) == 1


def test_pair_is_taken_only_where_both_stream(device, monkeypatch):
    """quant_linear_pair launches nothing and returns False unless x is one row's int8 rows and both matrices would
    stream (a part too narrow or of another type keeps its own launch); a mismatched K is a ValueError."""
    import braid_kernels.quant as quant
    import braid_kernels.quant_stream as quant_stream

    monkeypatch.setattr(quant_stream, "STREAM_MIN_ROWS", 8)
    launches = []
    monkeypatch.setattr(quant, "launch_stream_gemv_pair", lambda *args: launches.append(args))
    k = 512
    a = _planes(_random_blocks("Q4_K", 8, k, seed=1), "Q4_K", device)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(device)
    rows = quantize_rows(x[:1])
    out = torch.empty((1, 16), dtype=torch.bfloat16, device=device)
    narrow = _planes(_random_blocks("Q6_K", 4, k, seed=2), "Q6_K", device)
    q8 = torch.zeros((8, k // 32 * 34), dtype=torch.uint8, device=device)
    assert not quant_linear_pair(x[:1], a, "Q4_K", a, "Q4_K", out)  # 16-bit x, not its int8 rows
    assert not quant_linear_pair(quantize_rows(x), a, "Q4_K", a, "Q4_K", torch.empty((2, 16), device=device))
    assert not quant_linear_pair(rows, a, "Q4_K", narrow, "Q6_K", out[:, :12])
    assert not quant_linear_pair(rows, a, "Q4_K", q8, "Q8_0", out)
    assert not launches
    wide = _planes(_random_blocks("Q4_K", 8, 2 * k, seed=4), "Q4_K", device)
    with pytest.raises(ValueError, match="b has 1024 columns"):
        quant_linear_pair(rows, a, "Q4_K", wide, "Q4_K", out)
    with pytest.raises(ValueError, match="out must have shape"):
        quant_linear_pair(rows, a, "Q4_K", a, "Q4_K", out[:, :12])
    assert quant_linear_pair(rows, a, "Q4_K", a, "Q4_K", out) and len(launches) == 1


def test_first_row_outside_the_matrix_loads_nothing(device):
    """_first_row of a row before the first or past the last (the other matrix's programs in the pair kernel) gives
    zero fields, and of a row inside it that row's words."""
    @triton.jit
    def first_words(blocks_ptr, out_ptr, row, N, row_bytes, QTYPE: tl.constexpr, TYPE_SIZE: tl.constexpr,
                    GROUPS: tl.constexpr, WORDS: tl.constexpr, NUM_GROUPS: tl.constexpr, BLOCK_G: tl.constexpr):
        w, _, _, _, _, head = _first_row(blocks_ptr, row, N, row_bytes, QTYPE, TYPE_SIZE, GROUPS, WORDS, NUM_GROUPS,
                                         BLOCK_G)
        tl.store(out_ptr + tl.arange(0, BLOCK_G)[:, None] * WORDS + tl.arange(0, WORDS)[None, :], w + head)

    n, k = 3, 512
    planes = _planes(_random_blocks("Q4_K", n, k, seed=5), "Q4_K", device)
    groups = num_groups("Q4_K", k)
    sums = {}
    for row in (-1, 0, n - 1, n):
        out = torch.full((triton.next_power_of_2(groups), GROUP_LANES["Q4_K"] // 4), -1, dtype=torch.int32,
                         device=device)
        first_words[(1,)](planes, out, row, n, planes.shape[1], QTYPE=QTYPE_IDS["Q4_K"], TYPE_SIZE=TYPE_SIZE["Q4_K"],
                          GROUPS=GROUPS_PER_BLOCK["Q4_K"], WORDS=GROUP_LANES["Q4_K"] // 4, NUM_GROUPS=groups,
                          BLOCK_G=triton.next_power_of_2(groups))
        sums[row] = out
    assert not sums[-1].any() and not sums[n].any()
    assert sums[0].any() and sums[n - 1].any() and not torch.equal(sums[0], sums[n - 1])


def test_stream_is_taken_only_where_it_applies(device):
    """One row; Q4_K / Q6_K rows of whole words; at least STREAM_MIN_ROWS rows of at most STREAM_MAX_K weights; no
    bias. Elsewhere quant_dot's launch."""
    def planes(qtype, n, k):
        return torch.empty((n, k // 256 * TYPE_SIZE[qtype]), dtype=torch.uint8, device=device)

    assert uses_stream(1, "Q4_K", planes("Q4_K", STREAM_MIN_ROWS, 4096), None)
    assert uses_stream(1, "Q6_K", planes("Q6_K", STREAM_MIN_ROWS, STREAM_MAX_K), None)
    assert not uses_stream(2, "Q4_K", planes("Q4_K", STREAM_MIN_ROWS, 4096), None)
    assert not uses_stream(1, "Q4_K", planes("Q4_K", STREAM_MIN_ROWS, 4096), torch.zeros(STREAM_MIN_ROWS))
    assert not uses_stream(1, "Q4_K", planes("Q4_K", STREAM_MIN_ROWS - 1, 4096), None)
    assert not uses_stream(1, "Q4_K", planes("Q4_K", STREAM_MIN_ROWS, STREAM_MAX_K + 256), None)
    assert not uses_stream(1, "Q6_K", planes("Q6_K", STREAM_MIN_ROWS, 768), None)  # 630-byte rows: not whole words
    assert not uses_stream(1, "Q8_0", torch.empty((STREAM_MIN_ROWS, 136), dtype=torch.uint8), None)


def test_stream_launch_shape():
    """The swept launches: 2 warps for rows of 4096 (one for a 128256-row lm_head), 4 for rows of 14336; 16 programs
    per SM at K = 4096, 4 at 12288 and 14336 (a power of two), never more programs than rows."""
    assert stream_warps("Q4_K", 4096, 4096) == 2 and stream_warps("Q6_K", 1024, 4096) == 2
    assert stream_warps("Q6_K", 128256, 4096) == 1
    assert stream_warps("Q4_K", 4096, 14336) == 4 and stream_warps("Q6_K", 4096, 14336) == 4
    assert stream_programs(28672, 4096, 132) == 132 * 16 and stream_programs(4096, 14336, 132) == 132 * 4
    assert stream_programs(4096, 12288, 132) == 132 * 4 and stream_programs(4096, 3584, 132) == 132 * 16  # 5, 18
    assert stream_programs(100, 4096, 132) == 100


def test_stream_programs_are_bounded_by_what_an_sm_holds():
    """No more programs per SM than `resident` (what the compiled kernel lets an SM hold at once); fewer asked stay
    as asked; the rows still bound the total."""
    assert stream_programs(4096, 3584, 132, resident=14) == 132 * 14  # 16 asked
    assert stream_programs(4096, 2048, 132, resident=28) == 132 * 28  # 32 asked
    assert stream_programs(4096, 12288, 132, resident=5) == 132 * 4  # 4 asked, 5 fit
    assert stream_programs(4096, 4096, 132, resident=None) == 132 * 16
    assert stream_programs(100, 3584, 132, resident=14) == 100


def test_programs_that_fit_an_sm():
    """sm_90's limits as CUDA's occupancy calculator applies them, computed by hand: registers go to a warp in units
    of 256 from one of four 16K partitions (72 a thread: 2,304 a warp, 7 warps a partition), shared memory with 1 KB
    reserved a program, at most 64 warps and 32 programs."""
    assert programs_that_fit(72, 8, 2) == 14  # 7 * 4 // 2; the Q6_K stream kernel at K = 2048-4096 on 2 warps
    assert programs_that_fit(107, 1024, 4) == 4  # 107 * 32 = 3424 -> 3584 a warp: 4 a partition, 16 // 4
    assert programs_that_fit(94, 16, 4) == 5  # 3008 -> 3072: 5 a partition
    assert programs_that_fit(64, 256, 2) == 16  # 2048: 8 a partition
    assert programs_that_fit(104, 0, 2) == 8  # 3328: 4 a partition, 16 // 2 (65536 // (2 * 3328) would say 9)
    assert programs_that_fit(88, 0, 1) == 20  # 2816: 5 a partition (65536 // 2816 would say 23)
    assert programs_that_fit(32, 0, 1) == 32  # by registers 64: the 32-program limit
    assert programs_that_fit(16, 0, 8) == 8  # by warps: 64 // 8
    assert programs_that_fit(32, 100_000, 1) == 2  # by shared memory: 233472 // 101024
    assert programs_that_fit(255, 0, 32) == 1  # never fewer than one
    assert programs_that_fit(72, 8, 2, registers_per_sm=32768) == 6  # 3 a partition


def _driver_occupancy(compiled, warps: int) -> int:
    """Programs of a compiled Triton kernel one SM holds, as the CUDA driver computes them
    (cuOccupancyMaxActiveBlocksPerMultiprocessor, with the launch's dynamic shared memory)."""
    import ctypes

    cuda = ctypes.CDLL("libcuda.so.1")
    count = ctypes.c_int()
    rc = cuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(count), ctypes.c_void_p(compiled.function),
                                                          ctypes.c_int(32 * warps),
                                                          ctypes.c_size_t(compiled.metadata.shared))
    assert rc == 0, f"cuOccupancyMaxActiveBlocksPerMultiprocessor returned {rc}"
    return count.value


@pytest.mark.skipif(not torch.cuda.is_available(), reason="registers of a compiled kernel: CUDA")
@pytest.mark.parametrize("pair", [False, True])
def test_default_launch_is_bounded_by_the_driver_occupancy(pair):
    """On a GPU the default launch bounds its programs by what an SM holds of the kernel it launches: at rows of 3584
    weights (where sm_90's Q6_K kernel takes 72 registers a thread, benchmarks/stream_registers.py) the bound equals
    the CUDA driver's own occupancy count for that compiled kernel, reading it compiles no variant the launch does not
    use (one new variant for a new width, the pair's split of the programs included), and the product is the
    reference's."""
    import braid_kernels.quant_stream as quant_stream

    n, k = 1024, 3584
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16)
    rows = quantize_rows(x.cuda())
    kernel = quant_stream._stream_pair_kernel if pair else quant_stream._stream_kernel
    variants = kernel.device_caches[torch.cuda.current_device()][0]
    before, resident_before = set(variants), set(quant_stream._RESIDENT)
    if pair:
        a, b = _random_blocks("Q4_K", n, k, seed=13), _random_blocks("Q6_K", n, k, seed=14)
        pa, pb = _planes(a, "Q4_K", "cuda"), _planes(b, "Q6_K", "cuda")
        out = torch.full((1, 2 * n), float("nan"), dtype=torch.bfloat16, device="cuda")
        launch_stream_gemv_pair(rows, pa, "Q4_K", pb, "Q6_K", out, num_sms)
        want = torch.cat([quant_linear_reference(_int8_rows(x), blocks, qtype)
                          for blocks, qtype in ((a, "Q4_K"), (b, "Q6_K"))], dim=1)
        warps = max(stream_warps("Q4_K", n, k), stream_warps("Q6_K", n, k))
    else:
        blocks = _random_blocks("Q6_K", n, k, seed=11)
        planes = _planes(blocks, "Q6_K", "cuda")
        out = torch.full((1, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        launch_stream_gemv(rows, planes, "Q6_K", out, num_sms)
        want = quant_linear_reference(_int8_rows(x), blocks, "Q6_K")
        warps = stream_warps("Q6_K", n, k)
    assert_quant_close(out.cpu(), want.to(torch.bfloat16), torch.bfloat16)
    new = [variants[key] for key in set(variants) - before]
    assert len(new) == 1, f"{len(new)} variants compiled for one launch"
    compiled = new[0].result() if hasattr(new[0], "result") else new[0]
    bounds = [fit for key, fit in quant_stream._RESIDENT.items() if key not in resident_before]
    assert bounds == [_driver_occupancy(compiled, warps)]
