"""The torch attention backend's KV write through rows computed once per step (kv_rows + write_kv_rows) against the
plain indexed write (write_kv): the same pool, the slot -1 of padded rows included."""
from __future__ import annotations

import pytest
import torch

from braidinfer.attention.metadata import AttentionMetadata, SeqSpan
from braidinfer.attention.torch_backend import TorchAttention, kv_rows, write_kv, write_kv_rows


@pytest.mark.parametrize("pages, kv_heads, page_size, head_dim, tokens", [(7, 3, 4, 8, 5), (3, 1, 16, 64, 1),
                                                                          (5, 2, 1, 4, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_write_what_the_indexed_write_writes(pages, kv_heads, page_size, head_dim, tokens, dtype):
    g = torch.Generator().manual_seed(pages * 100 + tokens)
    want = torch.randn(pages, 2, kv_heads, page_size, head_dim, generator=g).to(dtype)
    got = want.clone()
    slots = torch.randperm(pages * page_size, generator=g)[:tokens]
    slots[0] = -1  # a padded row: the pool's last slot
    k, v = (torch.randn(tokens, kv_heads, head_dim, generator=g) for _ in range(2))
    write_kv(want, slots, k, v)
    write_kv_rows(got, kv_rows(got, slots), k, v)
    assert torch.equal(got, want)
    assert torch.equal(got[-1, 0, :, -1], k[0].to(dtype)) and torch.equal(got[-1, 1, :, -1], v[0].to(dtype))
    with pytest.raises(IndexError):  # a slot past the pool is an error, not a wrap-around
        write_kv_rows(got, kv_rows(got, torch.tensor([pages * page_size])), k[:1], v[:1])


def test_a_layer_call_writes_the_same_planned_or_not():
    """Every layer of a planned step writes through the step's rows; a call whose meta was not planned computes its
    own: both pools end equal to the indexed write's."""
    g = torch.Generator().manual_seed(3)
    layers, pages, kv_heads, page_size, head_dim = 2, 4, 2, 4, 8
    pools = [torch.zeros(layers, pages, 2, kv_heads, page_size, head_dim) for _ in range(3)]
    table = torch.tensor([2, 0], dtype=torch.int64)
    meta = AttentionMetadata([SeqSpan(0, 3, 3, table)], torch.tensor([8, 9, 10]), 3)
    q = torch.randn(3, 4, head_dim, generator=g)
    k, v = (torch.randn(3, kv_heads, head_dim, generator=g) for _ in range(2))
    planned, unplanned = TorchAttention(pools[0], head_dim ** -0.5), TorchAttention(pools[1], head_dim ** -0.5)
    planned.plan(meta)
    for layer in range(layers):
        out = planned(layer, q, k, v, meta)
        torch.testing.assert_close(unplanned(layer, q, k, v, meta), out, rtol=0, atol=0)
        write_kv(pools[2][layer], meta.slot_mapping, k, v)
    assert torch.equal(pools[0], pools[2]) and torch.equal(pools[1], pools[2])
