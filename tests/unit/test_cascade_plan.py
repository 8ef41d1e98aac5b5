"""Cascade decode on the host, without torch: how plan_cascade splits a step's page tables into a shared level (once per
group) and an own level, padded for a CUDA graph (that attention computed that way is plain attention:
test_cascade_merge.py; the kernels themselves: tests/gpu/test_cascade.py)."""
from __future__ import annotations

import bisect
import itertools
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from braidinfer.attention.cascade_plan import CascadeStep, find_shared_prefixes, plan_cascade

SCRATCH = 0  # the scratch page; drawn pages start at 1


@st.composite
def decode_steps(draw):
    """(page_size, page_tables, kv_lens, batch_size): rows under a random tree of shared prefixes (a system prompt,
    documents after it, ...) with pages of their own, KV ending anywhere in their last page, spare pages after it."""
    page_size = draw(st.sampled_from([1, 2, 16]))
    new_pages = itertools.count(SCRATCH + 1)

    def take(n):
        return list(itertools.islice(new_pages, n))

    prefixes = [[]]
    for _ in range(draw(st.integers(0, 5))):
        prefixes.append(draw(st.sampled_from(prefixes)) + take(draw(st.integers(1, 5))))
    tables, kv_lens = [], []
    for _ in range(draw(st.integers(0, 12))):
        prefix = draw(st.sampled_from(prefixes))
        table = prefix + take(draw(st.integers(0 if prefix else 1, 3)))  # no own page: KV ends in the prefix
        kv_lens.append((len(table) - 1) * page_size + draw(st.integers(1, page_size)))
        tables.append(table + take(draw(st.integers(0, 2))))
    return page_size, tables, kv_lens, max(1, len(tables) + draw(st.integers(0, 3)))


def _shareable(tables, kv_lens, page_size):
    """Each row's full pages before the one its new token goes to."""
    return [table[: (n - 1) // page_size] for table, n in zip(tables, kv_lens)]


def _most_saved_pages(prefixes) -> int:
    """Reference over an explicit trie of page ids, by the rule find_shared_prefixes documents: at a node of depth d,
    each subtree keeps its own groups or joins one group sharing d pages (so do rows ending there), whichever spares
    more, if that group spares more than its first row's d pages."""
    root = {"rows": 0, "ends": 0, "children": {}}
    for prefix in prefixes:
        node = root
        for page in prefix:
            node["rows"] += 1
            node = node["children"].setdefault(page, {"rows": 0, "ends": 0, "children": {}})
        node["rows"] += 1
        node["ends"] += 1

    def spared(node, depth):
        below = [(child["rows"], spared(child, depth + 1)) for child in node["children"].values()]
        gain = depth * node["ends"] + sum(depth * rows - s for rows, s in below if depth * rows > s)
        return sum(s for _, s in below) + (gain - depth if depth > 0 and gain > depth else 0)

    return spared(root, 0)


def _slot_groups(step: CascadeStep) -> list[int]:
    """The shared-level group of each slot."""
    return [bisect.bisect_right(step.shared_qo_indptr, j) - 1 for j in range(step.batch_size)]


def _pages(indptr, indices, i):
    return indices[indptr[i] : indptr[i + 1]]


def test_by_hand():
    # page_size 4. Rows 0 and 2 share pages 1, 2, 3; rows 1 and 3 share pages 1, 7, 8; row 4 shares nothing.
    # All four share page 1, but two groups of three pages spare more reads (6 pages) than one group of one (3).
    tables = [[1, 2, 3, 10], [1, 7, 8, 11], [1, 2, 3, 12, 13], [1, 7, 8, 14], [20, 21]]
    kv_lens = [14, 13, 19, 16, 5]
    step = plan_cascade(tables, kv_lens, page_size=4, batch_size=8, scratch_page=99, min_saved_tokens=0)
    assert step.order == [0, 2, 1, 3, 4, 5, 6, 7]  # groups, then the loner, then 3 padding rows
    assert step.in_group == [True] * 4 + [False] * 4
    assert step.shared_qo_indptr == [0, 2, 4, 8, 8, 8, 8, 8, 8]  # group, group, loner + padding, 5 empty slots
    assert step.shared_kv_indices == [1, 2, 3, 1, 7, 8] + [99] * 6
    assert step.shared_kv_indptr == [0, 3, 6, 7, 8, 9, 10, 11, 12]
    assert step.shared_kv_last_page_len == [4, 4, 1, 1, 1, 1, 1, 1]
    assert step.own_kv_indices == [10, 12, 13, 11, 14, 20, 21, 99, 99, 99]
    assert step.own_kv_indptr == [0, 1, 3, 4, 5, 7, 8, 9, 10]
    assert step.own_kv_last_page_len == [2, 3, 1, 4, 1, 1, 1, 1]
    assert (step.num_groups, step.num_saved_tokens) == (2, 24)
    assert step.rank() == [0, 2, 1, 3, 4, 5, 6, 7]
    # Row 2's new token (position 18: page 13, offset 2) is position 6 of its own pages 12, 13.
    assert step.new_token_positions() == [1, 0, 6, 3, 4, 0, 0, 0]
    assert plan_cascade(tables, kv_lens, 4, 8, 99, min_saved_tokens=25) is None
    assert plan_cascade(tables, kv_lens, 4, 8, 99, min_saved_tokens=24) == step


def test_nested_sharing():
    system, docs = [1, 2, 3, 4], [list(range(10 * i, 10 * i + 8)) for i in (1, 2)]  # a 4-page prompt, 8-page docs
    # 4 rows under each document: two groups of 12 pages spare 2 * 3 * 12 reads, one of 4 pages only 7 * 4.
    assert sorted(find_shared_prefixes([system + docs[i % 2] + [100 + i] for i in range(8)])) == [
        ([0, 2, 4, 6], 12), ([1, 3, 5, 7], 12)]
    # 4 rows under a document, 4 with the prompt alone: these still share the prompt.
    prefixes = [system + docs[0] + [100 + i] for i in range(4)] + [system + [200 + i] for i in range(4)]
    assert sorted(find_shared_prefixes(prefixes)) == [([0, 1, 2, 3], 12), ([4, 5, 6, 7], 4)]
    # One row under a 1-page document, 7 with the prompt alone: one group of 4 pages (7 * 4 > 6 * 4).
    prefixes = [system + [10, 100]] + [system + [200 + i] for i in range(7)]
    assert find_shared_prefixes(prefixes) == [(list(range(8)), 4)]
    assert find_shared_prefixes([[1, 2], [3, 4], [], [5]]) == []


@settings(max_examples=300, deadline=None)
@given(decode_steps())
def test_levels_hold_exactly_each_rows_pages_and_padding_only_the_scratch_page(case):
    page_size, tables, kv_lens, batch_size = case
    step = plan_cascade(tables, kv_lens, page_size, batch_size, SCRATCH, min_saved_tokens=0)
    b, num_seqs = batch_size, len(tables)
    assert step.batch_size == b and sorted(step.order) == list(range(b))
    qo, kv, own = step.shared_qo_indptr, step.shared_kv_indptr, step.own_kv_indptr
    assert len(qo) == len(kv) == len(own) == b + 1 and len(step.shared_kv_last_page_len) == b
    assert qo[0] == kv[0] == own[0] == 0 and qo[-1] == b
    assert all(x <= y for x, y in pairwise(qo))  # empty groups allowed
    assert all(x < y for x, y in pairwise(kv)) and all(x < y for x, y in pairwise(own))  # never 0 pages
    assert all(1 <= n <= page_size for n in step.shared_kv_last_page_len + step.own_kv_last_page_len)
    saved = 0
    for g in range(b):  # groups: contiguous slots; real ones share full pages that start every member's table
        slots, pages = range(qo[g], qo[g + 1]), _pages(kv, step.shared_kv_indices, g)
        assert all(step.in_group[j] == (g < step.num_groups) for j in slots)
        if g < step.num_groups:
            rows = [step.order[j] for j in slots]
            assert len(rows) >= 2 and all(row < num_seqs for row in rows)
            assert step.shared_kv_last_page_len[g] == page_size
            assert all(tables[row][: len(pages)] == pages and len(pages) <= (kv_lens[row] - 1) // page_size
                       for row in rows)
            saved += (len(rows) - 1) * len(pages) * page_size
        else:
            assert pages == [SCRATCH] and step.shared_kv_last_page_len[g] == 1
    assert step.num_saved_tokens == saved
    groups, rank, positions = _slot_groups(step), step.rank(), step.new_token_positions()
    for row in range(b):  # own level: the rest of the row's pages, the new token's slot as plain decode writes it
        slot = rank[row]
        own_pages, last = _pages(own, step.own_kv_indices, slot), step.own_kv_last_page_len[slot]
        page, offset = own_pages[positions[row] // page_size], positions[row] % page_size
        if row < num_seqs:
            shared = _pages(kv, step.shared_kv_indices, groups[slot]) if step.in_group[slot] else []
            used = (kv_lens[row] - 1) // page_size + 1
            assert shared + own_pages == tables[row][:used] and SCRATCH not in own_pages
            assert last == (kv_lens[row] - 1) % page_size + 1
            assert (page, offset) == (tables[row][used - 1], (kv_lens[row] - 1) % page_size)
        else:
            assert own_pages == [SCRATCH] and last == 1 and not step.in_group[slot] and (page, offset) == (SCRATCH, 0)


@settings(max_examples=300, deadline=None)
@given(decode_steps(), st.integers(0, 160))
def test_cascade_when_sharing_spares_enough_with_the_most_spared(case, min_saved_tokens):
    page_size, tables, kv_lens, batch_size = case
    step = plan_cascade(tables, kv_lens, page_size, batch_size, SCRATCH, min_saved_tokens)
    most = page_size * _most_saved_pages(_shareable(tables, kv_lens, page_size))
    if most < min_saved_tokens:
        assert step is None
    else:
        assert step is not None and step.num_saved_tokens == most
