"""Per-layer attention numerics (braidinfer.attention.spec) in the torch backend: sliding windows and logit soft-caps
against a query-by-query loop written from the definitions, over K/V scattered through a paged pool."""
from __future__ import annotations

import math

import pytest
import torch

from braidinfer.attention.metadata import AttentionMetadata, SeqSpan
from braidinfer.attention.spec import AttentionSpec, distinct_specs, non_plain_reason, per_layer_specs
from braidinfer.attention.torch_backend import TorchAttention

QH, KVH, HD, PS = 4, 2, 16, 4


def _reference(q, k, v, q_positions, spec):
    """q: [n, QH, HD] at absolute q_positions; k, v: [L, KVH, HD] -> [n, QH, HD], one query and head at a time."""
    out = torch.empty_like(q)
    for i, p in enumerate(q_positions):
        lo = 0 if spec.sliding_window is None else max(0, p - spec.sliding_window + 1)
        for h in range(QH):
            kh = h // (QH // KVH)
            scores = [float(q[i, h] @ k[j, kh]) * spec.scale for j in range(lo, p + 1)]
            if spec.logits_soft_cap is not None:
                scores = [spec.logits_soft_cap * math.tanh(s / spec.logits_soft_cap) for s in scores]
            weights = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
            out[i, h] = (weights[:, None] * v[lo : p + 1, kh].double()).sum(0).float()
    return out


SPECS = [AttentionSpec(HD**-0.5), AttentionSpec(0.3, sliding_window=5), AttentionSpec(0.25, logits_soft_cap=2.0),
         AttentionSpec(0.4, sliding_window=3, logits_soft_cap=1.5), AttentionSpec(0.2, sliding_window=1)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"w{s.sliding_window}-cap{s.logits_soft_cap}")
@pytest.mark.parametrize("cached,new", [(0, 11), (6, 5), (12, 1)])
def test_torch_backend_follows_the_spec(spec, cached, new):
    g = torch.Generator().manual_seed(0)
    total = cached + new
    k, v = torch.randn(total, KVH, HD, generator=g), torch.randn(total, KVH, HD, generator=g)
    q = torch.randn(new, QH, HD, generator=g) * 3  # large scores, so the cap bites
    num_pages = -(-total // PS)
    page_table = torch.randperm(10, generator=g)[:num_pages]  # scattered pages of a pool of 10
    pool = torch.zeros(1, 10, 2, KVH, PS, HD)
    slots = page_table[torch.arange(total) // PS] * PS + torch.arange(total) % PS
    backend = TorchAttention(pool, [spec])
    if cached:  # the cached tokens' KV written by an earlier step
        pool[0, slots[:cached] // PS, 0, :, slots[:cached] % PS] = k[:cached]
        pool[0, slots[:cached] // PS, 1, :, slots[:cached] % PS] = v[:cached]
    meta = AttentionMetadata([SeqSpan(0, new, total, page_table)], slots[cached:], new)
    out = backend(0, q, k[cached:], v[cached:], meta)
    expected = _reference(q, k, v, list(range(cached, total)), spec)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    if not spec.is_plain:  # the spec matters: plain attention gives something else
        plain = TorchAttention(pool.clone(), [AttentionSpec(spec.scale)])(0, q, k[cached:], v[cached:], meta)
        if new > 1 or (spec.sliding_window or total) < total or spec.logits_soft_cap:
            assert (plain - expected).abs().max() > 1e-3


def test_spec_validation_and_helpers():
    with pytest.raises(ValueError, match="sliding_window"):
        AttentionSpec(0.1, sliding_window=0)
    with pytest.raises(ValueError, match="logits_soft_cap"):
        AttentionSpec(0.1, logits_soft_cap=0.0)
    with pytest.raises(ValueError, match="scale"):
        AttentionSpec(0.0)
    assert AttentionSpec(1.0).window_left == -1 and AttentionSpec(1.0, sliding_window=4096).window_left == 4095
    specs = [AttentionSpec(1.0, sliding_window=8), AttentionSpec(1.0)] * 3
    assert distinct_specs(specs) == specs[:2]
    assert "sliding windows [8]" in non_plain_reason(specs)
    assert non_plain_reason([AttentionSpec(1.0)] * 2) is None
    assert per_layer_specs(0.5, 3) == [AttentionSpec(0.5)] * 3
    with pytest.raises(ValueError, match="2 attention specs"):
        per_layer_specs(specs[:2], 3)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"w{s.sliding_window}-cap{s.logits_soft_cap}")
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_several_decoding_sequences_in_one_step(spec, pool_dtype):
    """One new token each for sequences of different lengths over scattered pages of one pool (plain attention runs
    them in one padded, masked SDPA call; the others one sequence at a time), each row against the loop over its own
    sequence; a bfloat16 pool against the loop over what it holds (and, for SDPA, q rounded to it too)."""
    g = torch.Generator().manual_seed(1)
    lengths = [9, 1, 14, 4, 6]  # context after this step: page tables of 3, 1, 4, 1 and 2 pages
    pool = torch.zeros(1, 24, 2, KVH, PS, HD, dtype=pool_dtype)
    free = torch.randperm(24, generator=g).tolist()
    spans, new_slots, qs, new_k, new_v, expected = [], [], [], [], [], []
    for i, total in enumerate(lengths):
        page_table = torch.tensor([free.pop() for _ in range(-(-total // PS))])
        slots = page_table[torch.arange(total) // PS] * PS + torch.arange(total) % PS
        k, v = torch.randn(total, KVH, HD, generator=g), torch.randn(total, KVH, HD, generator=g)
        q = torch.randn(1, QH, HD, generator=g) * 3
        pool[0, slots[:-1] // PS, 0, :, slots[:-1] % PS] = k[:-1].to(pool_dtype)  # the cached tokens' KV
        pool[0, slots[:-1] // PS, 1, :, slots[:-1] % PS] = v[:-1].to(pool_dtype)
        spans.append(SeqSpan(i, 1, total, page_table))
        new_slots.append(slots[-1:])
        qs.append(q)
        new_k.append(k[-1:])
        new_v.append(v[-1:])
        if pool_dtype != torch.float32:
            k, v = k.to(pool_dtype).float(), v.to(pool_dtype).float()
            q = q.to(pool_dtype).float() if spec.logits_soft_cap is None else q
        expected.append(_reference(q, k, v, [total - 1], spec))
    meta = AttentionMetadata(spans, torch.cat(new_slots), len(lengths))
    out = TorchAttention(pool, [spec])(0, torch.cat(qs), torch.cat(new_k), torch.cat(new_v), meta)
    tol = dict(atol=1e-5, rtol=1e-4) if pool_dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, torch.cat(expected), **tol)
