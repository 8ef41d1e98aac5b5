"""braid_kernels/cpu_attention: the C kernel (QK-norm, RoPE, the K/V write, attention over the paged pool) against
its plain-PyTorch reference and against the torch attention backend the engine otherwise uses; rows independent of
the other rows of their step."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from braid_kernels import cpu_attention, cpu_library
from braidinfer.attention.metadata import AttentionMetadata, SeqSpan
from braidinfer.attention.torch_backend import TorchAttention

pytestmark = pytest.mark.skipif(not cpu_library.available(), reason=f"{cpu_library.unavailable_reason()}")
HEADS, KV_HEADS, HEAD_DIM, PAGE = 6, 2, 64, 16


def _step(spans: list[tuple[int, int, list[int]]], pages: int = 24):
    """Spans (q_len, context_len, page table) laid out one after another, each new token in its table's slot for
    its position, one-token spans decoding (generated) unless at position 0; -> (SeqSpans, slot_mapping)."""
    out, slots, start = [], [], 0
    for q_len, context_len, table in spans:
        out.append(SeqSpan(start, q_len, context_len, torch.tensor(table), generated=q_len == 1 and context_len > 1))
        slots += [table[p // PAGE] * PAGE + p % PAGE for p in range(context_len - q_len, context_len)]
        start += q_len
    return out, torch.tensor(slots)


def _inputs(rows: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(rows, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=gen)
    angles = torch.rand(rows, HEAD_DIM // 2, generator=gen) * 6
    angles = torch.cat((angles, angles), dim=1)
    return qkv, angles.cos(), angles.sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norms", [False, True])
@pytest.mark.parametrize("window", [None, 7])
def test_matches_reference(dtype, norms, window):
    """A prompt chunk of 5 rows (context 37 over two pages of a three-page table), a decode row at context 20, a
    one-row prompt: outputs and the written pool against attention_ref."""
    spans, slots = _step([(5, 37, [4, 9, 2]), (1, 20, [1, 7]), (1, 1, [11])])
    rows = cpu_attention.step_rows(spans, slots)
    qkv, cos, sin = _inputs(7, seed=1)
    gen = torch.Generator().manual_seed(5)
    norm = (torch.rand(HEAD_DIM, generator=gen) + 0.5, torch.rand(HEAD_DIM, generator=gen) + 0.5) if norms \
        else (None, None)
    pool = torch.randn(24, 2, KV_HEADS, PAGE, HEAD_DIM, generator=gen).to(dtype)
    expected_pool = pool.clone()
    out = cpu_attention.attention(qkv, HEADS, KV_HEADS, HEAD_DIM, pool, rows, 0.125, cos, sin, *norm, 1e-6, window)
    expected = cpu_attention.attention_ref(qkv, HEADS, KV_HEADS, HEAD_DIM, expected_pool, rows, 0.125, cos, sin,
                                           *norm, 1e-6, window)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the kernel rotates with fused multiply-adds: k can differ in float32's last bit, and so, rarely, a bfloat16
    # element by one step of its rounding (2^-7 relative at most)
    torch.testing.assert_close(pool.float(), expected_pool.float(), rtol=2 ** -7 if dtype == torch.bfloat16 else 0,
                               atol=0 if dtype == torch.bfloat16 else 1e-5)


def test_matches_the_torch_backend():
    """Against TorchAttention (the engine's reference backend): the same rotated q/k/v written and attended over the
    same pages, a bfloat16 pool; a step of a prompt and two decoding sequences."""
    spans, slots = _step([(3, 19, [5, 6]), (1, 33, [2, 3, 8]), (1, 9, [10])])
    qkv, cos, sin = _inputs(5, seed=2)
    pool = torch.randn(1, 24, 2, KV_HEADS, PAGE, HEAD_DIM).to(torch.bfloat16)
    backend = TorchAttention(pool.clone(), 0.125)
    meta = AttentionMetadata(spans=spans, slot_mapping=slots, num_tokens=5)
    x = qkv.view(5, -1, HEAD_DIM)
    rotate = (lambda y: y * cos[:, None] + torch.cat((-y[..., 32:], y[..., :32]), -1) * sin[:, None])
    q, k, v = rotate(x[:, :HEADS]), rotate(x[:, HEADS:HEADS + KV_HEADS]), x[:, HEADS + KV_HEADS:]
    expected = backend(0, q.contiguous(), k.contiguous(), v.contiguous(), meta).reshape(5, -1)
    out = cpu_attention.attention(qkv, HEADS, KV_HEADS, HEAD_DIM, pool[0],
                                  cpu_attention.step_rows(spans, slots), 0.125, cos, sin)
    # the backend attends with q rounded to bfloat16 (the pool's dtype); the kernel keeps q in float32
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-2)
    assert (out - expected).abs().mean() < 3e-3
    torch.testing.assert_close(pool.float(), backend.kv_cache.float(), rtol=0, atol=1e-2)


def test_rows_are_independent_of_their_step():
    """A decode row gives the same output bit for bit alone and in a step beside a prompt and other sequences."""
    alone_spans, alone_slots = _step([(1, 30, [3, 4])])
    mixed_spans, mixed_slots = _step([(4, 4, [9]), (1, 30, [3, 4]), (1, 12, [6])])
    qkv, cos, sin = _inputs(6, seed=3)
    pool = torch.randn(24, 2, KV_HEADS, PAGE, HEAD_DIM).to(torch.bfloat16)
    outs = []
    for spans, slots, rows in ((alone_spans, alone_slots, slice(4, 5)), (mixed_spans, mixed_slots, slice(0, 6))):
        out = cpu_attention.attention(qkv[rows].contiguous(), HEADS, KV_HEADS, HEAD_DIM, pool.clone(),
                                      cpu_attention.step_rows(spans, slots), 0.125, cos[rows].contiguous(),
                                      sin[rows].contiguous(), threads=2)
        outs.append(out)
    assert torch.equal(outs[0][0], outs[1][4])


def test_refuses_bad_arguments():
    spans, slots = _step([(1, 3, [0])])
    rows = cpu_attention.step_rows(spans, slots)
    qkv, cos, sin = _inputs(1, seed=4)
    pool = torch.zeros(2, 2, KV_HEADS, PAGE, HEAD_DIM)
    with pytest.raises(ValueError, match="qkv"):
        cpu_attention.attention(qkv[:, :-1], HEADS, KV_HEADS, HEAD_DIM, pool, rows, 0.125)
    with pytest.raises(ValueError, match="pool"):
        cpu_attention.attention(qkv, HEADS, KV_HEADS, HEAD_DIM, pool.half(), rows, 0.125)
    with pytest.raises(ValueError, match="both or neither"):
        cpu_attention.attention(qkv, HEADS, KV_HEADS, HEAD_DIM, pool, rows, 0.125, cos=cos)


def test_the_backend_picks_the_decoding_rows():
    """TorchAttention.decode_rows: the rows of generated-token spans (the engine's C path) with their slots,
    positions and page tables; None for an all-decode step's index, None rows for a step without decoding sequences
    (a prompt's single token left by a prefix-cache hit is not decoding)."""
    spans, slots = _step([(3, 19, [5, 6]), (1, 33, [2, 3, 8]), (1, 9, [10])])
    backend = TorchAttention(torch.zeros(1, 24, 2, KV_HEADS, PAGE, HEAD_DIM), 0.125)
    index, rows = backend.decode_rows(AttentionMetadata(spans=spans, slot_mapping=slots, num_tokens=5))
    assert index.tolist() == [3, 4]
    assert rows.slots.tolist() == slots[3:].tolist() and rows.positions.tolist() == [32, 8]
    assert rows.tables[rows.table_start[0]:][:3].tolist() == [2, 3, 8] and rows.tables[rows.table_start[1]] == 10
    decode_spans, decode_slots = _step([(1, 33, [2, 3, 8]), (1, 9, [10])])
    index, rows = backend.decode_rows(AttentionMetadata(spans=decode_spans, slot_mapping=decode_slots, num_tokens=2))
    assert index is None and rows.positions.tolist() == [32, 8]
    prompt_spans, prompt_slots = _step([(3, 19, [5, 6]), (1, 17, [4, 9])])
    prompt_spans[1] = SeqSpan(3, 1, 17, torch.tensor([4, 9]), generated=False)  # the last prompt token, alone
    assert backend.decode_rows(AttentionMetadata(spans=prompt_spans, slot_mapping=prompt_slots, num_tokens=4)) \
        == (None, None)


def test_step_rows_are_checked_against_the_pool():
    """Rows that would write or read outside the pool are refused before the kernel runs."""
    spans, slots = _step([(1, 20, [1, 7])])
    qkv, cos, sin = _inputs(1, seed=6)
    pool = torch.zeros(8, 2, KV_HEADS, PAGE, HEAD_DIM)
    cpu_attention.attention(qkv, HEADS, KV_HEADS, HEAD_DIM, pool, cpu_attention.step_rows(spans, slots), 0.125)
    with pytest.raises(ValueError, match="pool of 7 pages"):  # page 7 is outside a 7-page pool
        cpu_attention.attention(qkv, HEADS, KV_HEADS, HEAD_DIM, pool[:7].contiguous(),
                                cpu_attention.step_rows(spans, slots), 0.125)
    with pytest.raises(ValueError, match=">= 0"):
        cpu_attention.step_rows(spans, torch.tensor([-1]))
    short = [SimpleNamespace(q_start=0, q_len=1, context_len=40, page_table=torch.tensor([1, 7]))]  # 40 > 2 pages
    with pytest.raises(ValueError, match="reach past"):
        cpu_attention.attention(qkv, HEADS, KV_HEADS, HEAD_DIM, pool, cpu_attention.step_rows(short, slots), 0.125)


@pytest.mark.parametrize("window", [None, 300])
def test_long_rows_attend_in_parts(window):
    """Rows of 600-700 keys: the kernel attends in parts of 256 keys and merges them (flash-decoding); against the
    reference, and each row the same alone as beside another sequence, with two threads splitting the parts."""
    table = list(range(1, 45))
    spans, slots = _step([(2, 700, table)], pages=48)
    rows = cpu_attention.step_rows(spans, slots)
    qkv, cos, sin = _inputs(2, seed=7)
    pool = torch.randn(48, 2, KV_HEADS, PAGE, HEAD_DIM, generator=torch.Generator().manual_seed(8))
    expected_pool = pool.clone()
    out = cpu_attention.attention(qkv, HEADS, KV_HEADS, HEAD_DIM, pool, rows, 0.125, cos, sin, window=window,
                                  threads=2)
    expected = cpu_attention.attention_ref(qkv, HEADS, KV_HEADS, HEAD_DIM, expected_pool, rows, 0.125, cos, sin,
                                           window=window)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    mixed_spans, mixed_slots = _step([(1, 5, [47]), (2, 700, table)], pages=48)
    mixed = cpu_attention.attention(torch.cat((qkv[:1], qkv)), HEADS, KV_HEADS, HEAD_DIM, pool.clone(),
                                    cpu_attention.step_rows(mixed_spans, mixed_slots), 0.125, torch.cat((cos[:1], cos)),
                                    torch.cat((sin[:1], sin)), window=window, threads=2)
    assert torch.equal(mixed[1:], out)
