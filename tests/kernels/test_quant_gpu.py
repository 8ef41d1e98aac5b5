"""The GGML-block kernels on CUDA at a decoder's real shapes, against gguf's decoder plus float32 torch, and replayed
from a CUDA graph (the engine captures decode steps)."""
from __future__ import annotations

import pytest
import torch

from braid_kernels.quant import (
    GEMM_DEFAULT_ROWS,
    GEMM_MIN_WEIGHTS,
    HALF_BLOCK_ROWS,
    MAX_ROWS,
    QTYPES,
    dequantize,
    dequantize_reference,
    linear_path,
    quant_embedding,
    quant_embedding_reference,
    quant_linear,
    quant_linear_reference,
    to_planes,
)
from tests.kernels.test_quant import _assert_close, _int8_rows, _weights

pytestmark = pytest.mark.gpu
QTYPE_LIST = sorted(QTYPES)


@pytest.mark.parametrize("qtype", QTYPE_LIST)
def test_real_shape_on_gpu(qtype):
    n, k = 4096, 4096
    _, blocks = _weights(n, k, seed=11, qtype=qtype)
    gpu_blocks = to_planes(blocks, qtype).cuda()
    assert torch.equal(dequantize(gpu_blocks, qtype, torch.float32).cpu(), dequantize_reference(blocks, qtype))
    for num_rows in (1, 2, 5, 8, 16, 130):
        x = torch.randn(num_rows, k, generator=torch.Generator().manual_seed(num_rows)).to(torch.bfloat16)
        want = quant_linear_reference(x, blocks, qtype)
        if num_rows > MAX_ROWS:  # the GEMM paths round the weights to x's dtype first
            want = (x.float() @ dequantize_reference(blocks, qtype).to(torch.bfloat16).float().t()).to(torch.bfloat16)
            _assert_close(quant_linear(x.cuda(), gpu_blocks, qtype, path="gemm").cpu(), want, torch.bfloat16)
        else:  # the float GEMV; the integer-dot path computes with x rounded to int8 per 32 columns
            _assert_close(quant_linear(x.cuda(), gpu_blocks, qtype, path="gemv").cpu(), want, torch.bfloat16)
            want = quant_linear_reference(_int8_rows(x), blocks, qtype).to(torch.bfloat16)
            _assert_close(quant_linear(x.cuda(), gpu_blocks, qtype, path="dot").cpu(), want, torch.bfloat16)
            continue
        _assert_close(quant_linear(x.cuda(), gpu_blocks, qtype).cpu(), want, torch.bfloat16)
    ids = torch.tensor([4095, 0, 17, 17])
    assert torch.equal(quant_embedding(ids.cuda(), gpu_blocks, qtype).cpu(),
                       quant_embedding_reference(ids, blocks, qtype, torch.bfloat16))


@pytest.mark.parametrize("qtype", QTYPE_LIST)
def test_fused_gemm_on_gpu(qtype):
    """The fused GEMM at prefill-like M on a ragged N (1000) and a full one, against gguf's weights rounded to bf16
    (as the GEMM rounds them) and float32 sums; then the same M through dequantise + cuBLAS."""
    for n, k in ((1000, 2048), (4096, 4096)):
        _, blocks = _weights(n, k, seed=n + 1, qtype=qtype)
        gpu_blocks = to_planes(blocks, qtype).cuda()
        w = dequantize_reference(blocks, qtype).to(torch.bfloat16).float()
        for num_rows in (3, 9, 64, 300):
            x = torch.randn(num_rows, k, generator=torch.Generator().manual_seed(num_rows)).to(torch.bfloat16)
            want = (x.float() @ w.t()).to(torch.bfloat16)
            for path in ("gemm", "dequantize"):
                _assert_close(quant_linear(x.cuda(), gpu_blocks, qtype, path=path).cpu(), want, torch.bfloat16)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q8_0"])
def test_default_paths_of_a_large_matrix_on_gpu(qtype):
    """8192 x 4096 (2^25 weights, GEMM_MIN_WEIGHTS): the default path is the fused GEMM from 5 to 64 rows (Q4_K and
    Q6_K: to HALF_BLOCK_ROWS) and dequantise + cuBLAS above; both against gguf's weights rounded to bf16 and float32
    sums."""
    n, k = 8192, 4096
    assert n * k >= GEMM_MIN_WEIGHTS
    _, blocks = _weights(n, k, seed=21, qtype=qtype)
    gpu_blocks = to_planes(blocks, qtype).cuda()
    w = dequantize_reference(blocks, qtype).to(torch.bfloat16).float()
    last = HALF_BLOCK_ROWS if qtype in ("Q4_K", "Q6_K") else GEMM_DEFAULT_ROWS
    for num_rows, path in ((5, "gemm"), (16, "gemm"), (33, "gemm"), (64, "gemm"), (last, "gemm"),
                           (last + 1, "dequantize")):
        assert linear_path(num_rows, torch.bfloat16, n * k, qtype) == path
        x = torch.randn(num_rows, k, generator=torch.Generator().manual_seed(num_rows)).to(torch.bfloat16)
        _assert_close(quant_linear(x.cuda(), gpu_blocks, qtype).cpu(), (x.float() @ w.t()).to(torch.bfloat16),
                      torch.bfloat16)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q8_0"])
def test_narrow_and_wide_outputs_on_gpu(qtype):
    """N = 1024 (k/v projections: fewer rows per program), a ragged N, and N = 128 (K split into slices)."""
    for n, k in ((1024, 4096), (1000, 2048), (128, 4096)):
        _, blocks = _weights(n, k, seed=n, qtype=qtype)
        x = torch.randn(1, k, generator=torch.Generator().manual_seed(n)).to(torch.bfloat16)
        _assert_close(quant_linear(x.cuda(), to_planes(blocks, qtype).cuda(), qtype, path="gemv").cpu(),
                      quant_linear_reference(x, blocks, qtype), torch.bfloat16)
        _assert_close(quant_linear(x.cuda(), to_planes(blocks, qtype).cuda(), qtype, path="dot").cpu(),
                      quant_linear_reference(_int8_rows(x), blocks, qtype).to(torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0"])
def test_replays_from_a_cuda_graph(qtype):
    n, k = 2048, 1024
    _, blocks = _weights(n, k, seed=12, qtype=qtype)
    gpu_blocks = to_planes(blocks, qtype).cuda()
    x = torch.zeros(4, k, dtype=torch.bfloat16, device="cuda")
    ids = torch.zeros(3, dtype=torch.int64, device="cuda")
    quant_linear(x, gpu_blocks, qtype)  # compile outside the capture
    quant_embedding(ids, gpu_blocks, qtype)
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            y = quant_linear(x, gpu_blocks, qtype)
            e = quant_embedding(ids, gpu_blocks, qtype)
    torch.cuda.current_stream().wait_stream(stream)
    for seed in (1, 2):
        new_x = torch.randn(4, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
        new_ids = torch.randint(0, n, (3,), generator=torch.Generator().manual_seed(seed))
        x.copy_(new_x)
        ids.copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        want = quant_linear_reference(_int8_rows(new_x), blocks, qtype).to(torch.bfloat16)  # the integer-dot path
        _assert_close(y.cpu(), want, torch.bfloat16)
        assert torch.equal(e.cpu(), quant_embedding_reference(new_ids, blocks, qtype, torch.bfloat16))
