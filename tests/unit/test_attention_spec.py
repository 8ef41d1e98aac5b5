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
