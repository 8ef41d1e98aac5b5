"""Cascade decode (FlashInferCascadeDecode) against plain attention on random bf16 page pools where groups of rows share
prefix pages: eager, and replayed from a CUDA graph captured on a step of padding only, re-planned between replays
with other groupings (the host side: tests/unit/test_cascade_plan.py)."""
from __future__ import annotations

import random

import pytest
import torch

from braidinfer.attention import AttentionMetadata, SeqSpan, TorchAttention
from braidinfer.attention.cascade import cascade_decoders, plan_cascade
from braidinfer.attention.flashinfer_backend import FlashInferAttention
from tests.gpu.test_gpu_parity import NEEDS_FLASHINFER

pytestmark = [pytest.mark.gpu, NEEDS_FLASHINFER]

PAGE_SIZE = 16
NUM_QO_HEADS, NUM_KV_HEADS, HEAD_DIM = 16, 8, 128  # Qwen3-0.6B's layout (the fa2 prefill module compiles on first use)
NUM_PAGES = 2048
SCRATCH = NUM_PAGES - 1  # the graphs' scratch page; the tables never use it
MAX_NUM_KV_INDICES = 4096


def _tables(seed: int, groups: list[tuple[int, int]], num_loners: int) -> tuple[list[list[int]], list[int]]:
    """Page tables and KV lengths (new token included) of groups of (rows, shared pages), each row with 1-3 pages of
    its own, and of loners sharing nothing, in shuffled order (a group's rows are not neighbours in the batch)."""
    rng = random.Random(seed)
    free = iter(rng.sample(range(SCRATCH), SCRATCH))
    rows = []
    for num_rows, num_shared in groups:
        prefix = [next(free) for _ in range(num_shared)]
        for _ in range(num_rows):
            kv_len = num_shared * PAGE_SIZE + rng.randint(1, 3 * PAGE_SIZE)
            rows.append((prefix + [next(free) for _ in range(-(-kv_len // PAGE_SIZE) - num_shared)], kv_len))
    for _ in range(num_loners):
        kv_len = rng.randint(1, 24 * PAGE_SIZE)
        rows.append(([next(free) for _ in range(-(-kv_len // PAGE_SIZE))], kv_len))
    rng.shuffle(rows)
    return [table for table, _ in rows], [kv_len for _, kv_len in rows]


def _randn(*shape, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", generator=g).to(torch.bfloat16)


def _inputs(batch_size: int, seed: int):
    """q [b, qo_heads, head_dim], k, v [b, kv_heads, head_dim] in bf16; rows past the step's sequences are padding."""
    return (_randn(batch_size, NUM_QO_HEADS, HEAD_DIM, seed=seed),
            *(_randn(batch_size, NUM_KV_HEADS, HEAD_DIM, seed=seed + i) for i in (1, 2)))


def _reference(pool, tables, kv_lens, q, k, v):
    """Plain attention in float32 through the torch backend, which also writes the new K/V, on a copy of the pool:
    (out [B, qo_heads, head_dim], pool copy)."""
    ref_pool = pool.float()
    spans, slots = [], []
    for i, (table, kv_len) in enumerate(zip(tables, kv_lens)):
        spans.append(SeqSpan(i, 1, kv_len, torch.tensor(table, device="cuda")))
        slots.append(table[(kv_len - 1) // PAGE_SIZE] * PAGE_SIZE + (kv_len - 1) % PAGE_SIZE)
    meta = AttentionMetadata(spans, torch.tensor(slots, device="cuda"), len(tables))
    n = len(tables)
    return TorchAttention(ref_pool, HEAD_DIM**-0.5)(0, q[:n].float(), k[:n].float(), v[:n].float(), meta), ref_pool


def _check(out, pool, ref_out, ref_pool) -> None:
    assert out.shape[1:] == (NUM_QO_HEADS, HEAD_DIM) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out[: len(ref_out)].float(), ref_out, atol=2e-2, rtol=2e-2)
    # The new K/V landed where plain decode puts them (exact copies of bf16 values); padding wrote the scratch page.
    torch.testing.assert_close(pool[:, :SCRATCH].float(), ref_pool[:, :SCRATCH], atol=0, rtol=0)


@pytest.fixture
def backend():
    pool = _randn(1, NUM_PAGES, 2, NUM_KV_HEADS, PAGE_SIZE, HEAD_DIM, seed=0)  # one layer
    return FlashInferAttention(pool, HEAD_DIM**-0.5, NUM_QO_HEADS)


def test_eager_step_with_padding_equals_plain_attention(backend):
    tables, kv_lens = _tables(1, groups=[(20, 50), (12, 5), (6, 17)], num_loners=4)  # 42 rows in a bucket of 48
    step = plan_cascade(tables, kv_lens, PAGE_SIZE, 48, SCRATCH, min_saved_tokens=0)
    assert step.num_groups == 3 and step.num_saved_tokens == PAGE_SIZE * (19 * 50 + 11 * 5 + 5 * 17)
    decoder = cascade_decoders(backend, [48], MAX_NUM_KV_INDICES)[48]
    q, k, v = _inputs(48, seed=10)
    ref_out, ref_pool = _reference(backend.kv_cache, tables, kv_lens, q, k, v)
    decoder.plan(step)
    _check(decoder(0, q, k, v, None), backend.kv_cache, ref_out, ref_pool)
    # The new K/V already written (as the model's fused kernel leaves them): attention alone gives the same.
    _check(decoder.attend(0, q, None), backend.kv_cache, ref_out, ref_pool)


def test_graph_captured_on_padding_replays_re_planned_groupings(backend):
    b = 64
    decoder = cascade_decoders(backend, [b], MAX_NUM_KV_INDICES)[b]
    q, k, v = _inputs(b, seed=20)  # static inputs
    # As DecodeGraphs captures: plan a step of padding only, warm up on the capture stream, capture.
    decoder.plan(plan_cascade([], [], PAGE_SIZE, b, SCRATCH, min_saved_tokens=0))
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decoder(0, q, k, v, None)
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            out = decoder(0, q, k, v, None)
    torch.cuda.current_stream().wait_stream(stream)
    cases = {  # seed: (groups of (rows, shared pages), loners)
        21: ([(30, 8), (10, 40)], 8),
        22: ([(2, 5)], 30),  # a small group among many loners
        23: ([], 20),  # nothing shared: every row through the own level alone
        24: ([(64, 30)], 0),  # the whole bucket one group, no padding
    }
    for seed, (groups, num_loners) in cases.items():
        tables, kv_lens = _tables(seed, groups, num_loners)
        step = plan_cascade(tables, kv_lens, PAGE_SIZE, b, SCRATCH, min_saved_tokens=0)
        assert step.num_groups == len(groups)
        for static, new in zip((q, k, v), _inputs(b, seed)):
            static.copy_(new)
        ref_out, ref_pool = _reference(backend.kv_cache, tables, kv_lens, q, k, v)
        decoder.plan(step)
        graph.replay()
        _check(out, backend.kv_cache, ref_out, ref_pool)
