"""In PyTorch on the CPU: attention computed the way cascade decode splits it (plan_cascade's two levels, merged by
log-sum-exp) is the plain attention over each row's pages (the kernels themselves: tests/gpu/test_cascade.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings

from braidinfer.attention.cascade_plan import plan_cascade
from tests.unit.test_cascade_plan import SCRATCH, _pages, _slot_groups, decode_steps


def _attend(q, k, v, scale):
    """q: [qh, d]; k, v: [L, kvh, d] -> out [qh, d], natural-log lse [qh]; GQA by repeating KV heads."""
    group = q.shape[0] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (L, qh, d)
    logits = torch.einsum("hd,lhd->hl", q, k) * scale  # (qh, L)
    return torch.einsum("hl,lhd->hd", logits.softmax(-1), v), logits.logsumexp(-1)


def _merge_states(out_a, lse_a, out_b, lse_b):
    """Attention over the union of two KV sets from each one's output and log-sum-exp."""
    lse = torch.logaddexp(lse_a, lse_b)  # (qh,)
    return out_a * (lse_a - lse).exp()[:, None] + out_b * (lse_b - lse).exp()[:, None], lse


def _sdpa(q, k, v, scale):
    """Plain attention of one query row: q [qh, d]; k, v [L, kvh, d] -> [qh, d]."""
    out = F.scaled_dot_product_attention(q[None, :, None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         scale=scale, enable_gqa=True)  # (1, qh, 1, d)
    return out[0, :, 0]


def _gather(pool, pages, num_tokens):
    """K and V [num_tokens, kvh, d] of the first num_tokens slots of `pages` in a pool [P, 2, kvh, ps, d]."""
    kv = pool[pages].permute(1, 0, 3, 2, 4).flatten(1, 2)  # (2, len(pages) * ps, kvh, d)
    return kv[0, :num_tokens], kv[1, :num_tokens]


def test_merged_attention_over_two_kv_sets_is_attention_over_both():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(8, 16, dtype=torch.float64, generator=g)  # 8 query heads over 4 KV heads
    k, v = (torch.randn(45, 4, 16, dtype=torch.float64, generator=g) * 3 for _ in range(2))
    for cut in (1, 17, 44):
        a, b = _attend(q, k[:cut], v[:cut], 0.25), _attend(q, k[cut:], v[cut:], 0.25)
        out, lse = _merge_states(*a, *b)
        torch.testing.assert_close(out, _sdpa(q, k, v, 0.25))
        torch.testing.assert_close(lse, _attend(q, k, v, 0.25)[1])


@settings(max_examples=60, deadline=None)
@given(decode_steps())
def test_cascade_attention_of_a_planned_step_is_plain_attention(case):
    """The cascade computation as FlashInferCascadeDecode does it, in PyTorch: rows permuted into slots, own level for
    every slot, shared level merged where in_group, back to batch order; against plain attention per row."""
    page_size, tables, kv_lens, batch_size = case
    step = plan_cascade(tables, kv_lens, page_size, batch_size, SCRATCH, min_saved_tokens=0)
    g = torch.Generator().manual_seed(len(tables))
    num_pages = 1 + max((p for t in tables for p in t), default=0)
    pool = torch.randn(num_pages, 2, 2, page_size, 8, dtype=torch.float64, generator=g)  # kvh 2, head_dim 8
    q = torch.randn(batch_size, 4, 8, dtype=torch.float64, generator=g)[step.order]  # (b, qh 4, d) in slot order
    groups, out = _slot_groups(step), []
    for slot in range(batch_size):
        own_pages, last = _pages(step.own_kv_indptr, step.own_kv_indices, slot), step.own_kv_last_page_len[slot]
        state = _attend(q[slot], *_gather(pool, own_pages, (len(own_pages) - 1) * page_size + last), 0.3)
        if step.in_group[slot]:
            shared = _pages(step.shared_kv_indptr, step.shared_kv_indices, groups[slot])
            state = _merge_states(*state, *_attend(q[slot], *_gather(pool, shared, len(shared) * page_size), 0.3))
        out.append(state[0])
    out = torch.stack(out)[step.rank()]  # (b, qh, d) in batch order
    q = q[step.rank()]
    for row, (table, kv_len) in enumerate(zip(tables, kv_lens)):
        torch.testing.assert_close(out[row], _sdpa(q[row], *_gather(pool, table, kv_len), 0.3))
