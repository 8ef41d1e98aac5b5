"""Cascade decode on the host: which running sequences share prefix pages, and the two levels of page tables that
`braidinfer.attention.cascade.FlashInferCascadeDecode` runs for them. Plain Python, no torch.

The prefix cache hands a shared prefix out as the very same physical pages, so sharing shows in the page tables: rows
whose tables start with the same page ids. `plan_cascade` finds the groups (`find_shared_prefixes`) and splits each
row's attention in two levels, padded to a CUDA graph's batch size:

- shared level: one request per group, the group's rows (contiguous slots) against the group's shared full pages.
- own level: one request per row over its remaining pages (always >= 1: the last page, which the new token is written
  to, is never shared).
- Rows are listed in group order: groups first, then rows without a group, then the bucket's padding rows.
- The shared level always has `batch_size` slots and `batch_size` query rows in all: the real groups, one slot
  holding every ungrouped and padding row (attending to the scratch page; its result is masked out of the merge), and
  empty slots with 0 query rows over the scratch page (why a fixed shape: see cascade.py). No slot has 0 KV pages.
- Padding rows of the own level are one token in the scratch page, as in `braidinfer.graph_buckets.pad_decode_batch`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

from braidinfer.attention.metadata import paged_kv_tables

DEFAULT_MIN_SAVED_TOKENS = 16384
"""Cascade only when it spares reading this many KV tokens (per layer and KV head) in a step. A guess: each layer pays
a few extra kernels (~10 us in a graph), ~8k tokens of Qwen3-0.6B's KV at 3 TB/s; the benchmark should tune it."""


@dataclass(frozen=True)
class CascadeStep:
    """One decode step split into a shared and an own level, padded to `batch_size` rows for a CUDA graph; page
    tables in FlashInfer's CSR form. Both levels list rows in group order: slot j holds batch row order[j] (rows past
    the step's sequences are padding); shared-level group g holds slots shared_qo_indptr[g]:shared_qo_indptr[g + 1]."""

    page_size: int
    order: list[int]  # [b]: the batch row in each slot
    in_group: list[bool]  # [b]: slot j's row attends to its group's shared pages (merged with its own level)
    shared_qo_indptr: list[int]  # [b + 1]: a group's slots; empty groups have none
    shared_kv_indptr: list[int]  # [b + 1]
    shared_kv_indices: list[int]  # [shared_kv_indptr[-1]]: each group's shared pages, then scratch pages
    shared_kv_last_page_len: list[int]  # [b]: page_size for real groups, 1 for the scratch page
    own_kv_indptr: list[int]  # [b + 1]: per slot, the row's pages after its group's shared ones
    own_kv_indices: list[int]  # [own_kv_indptr[-1]]
    own_kv_last_page_len: list[int]  # [b] in [1, page_size]; the last own page holds the new token
    num_groups: int
    """Groups with shared pages (the first num_groups slots of the shared level)."""
    num_saved_tokens: int
    """KV tokens per layer and KV head that plain decode would read more than once: sum of (size - 1) * shared."""

    @property
    def batch_size(self) -> int:
        return len(self.order)

    def rank(self) -> list[int]:
        """[b]: the slot of each batch row (the inverse permutation of `order`)."""
        rank = [0] * len(self.order)
        for slot, row in enumerate(self.order):
            rank[row] = slot
        return rank

    def new_token_positions(self) -> list[int]:
        """[b]: where each batch row's new token goes, as a position in its slot's own-level pages (the KV append
        runs over the own level, with batch index rank()[row])."""
        indptr, last = self.own_kv_indptr, self.own_kv_last_page_len
        slot_pos = [(indptr[j + 1] - indptr[j] - 1) * self.page_size + last[j] - 1 for j in range(len(last))]
        return [slot_pos[j] for j in self.rank()]


def plan_cascade(page_tables: Sequence[Sequence[int]], kv_lens: Sequence[int], page_size: int, batch_size: int,
                 scratch_page: int, min_saved_tokens: int = DEFAULT_MIN_SAVED_TOKENS) -> CascadeStep | None:
    """The cascade split of a decode step where sequence i's KV, new token included, is kv_lens[i] tokens in the pages
    of page_tables[i] (which may hold spare pages past those), padded to `batch_size` rows; or None when sharing
    spares fewer than `min_saved_tokens` KV tokens (then plain decode is the better step). min_saved_tokens=0 always
    gives a step (the capture of a bucket's graph uses the one of no sequences)."""
    num_seqs = len(page_tables)
    if batch_size < 1 or num_seqs > batch_size or len(kv_lens) != num_seqs:
        raise ValueError(f"{num_seqs} sequences ({len(kv_lens)} KV lengths) do not fit a batch of {batch_size}")
    num_used = [(n - 1) // page_size + 1 for n in kv_lens]  # pages holding KV; the last one gets the new token
    groups = find_shared_prefixes([table[: n - 1] for table, n in zip(page_tables, num_used)])  # full pages only
    saved = page_size * sum((len(rows) - 1) * num_shared for rows, num_shared in groups)
    if saved < min_saved_tokens:
        return None
    step = _Levels(page_size)
    for rows, num_shared in groups:
        step.add_group(page_tables[rows[0]][:num_shared], num_shared * page_size, len(rows))
        for row in rows:
            step.add_row(row, page_tables[row][num_shared : num_used[row]], kv_lens[row] - num_shared * page_size,
                         in_group=True)
    grouped = {row for rows, _ in groups for row in rows}
    loners = [row for row in range(num_seqs) if row not in grouped]
    if loners or num_seqs < batch_size:  # one slot for all of them, masked out of the merge
        step.add_group([scratch_page], 1, len(loners) + batch_size - num_seqs)
        for row in loners:
            step.add_row(row, page_tables[row][: num_used[row]], kv_lens[row], in_group=False)
        for row in range(num_seqs, batch_size):
            step.add_row(row, [scratch_page], 1, in_group=False)
    while len(step.shared_kv_lens) < batch_size:
        step.add_group([scratch_page], 1, 0)
    return step.done(num_groups=len(groups), num_saved_tokens=saved)


def find_shared_prefixes(prefixes: Sequence[Sequence[int]]) -> list[tuple[list[int], int]]:
    """Disjoint groups of rows whose `prefixes` (lists) start with the same items, as (rows, num_shared): >= 2 rows,
    all starting with the same num_shared >= 1 items. A group spares (len(rows) - 1) * num_shared item reads. Chosen
    bottom-up over the trie of the prefixes: at a node of depth d, each subtree either keeps its own groups or joins
    one group at the node sharing d items (so do rows ending there), whichever spares more. The trie's nodes are
    found from the common prefixes of neighbours in sorted order."""
    order = sorted(range(len(prefixes)), key=prefixes.__getitem__)
    lcp = [0] * len(order)  # lcp[k]: common prefix length of the rows sorted k - 1 and k
    for k in range(1, len(order)):
        lcp[k] = _common_prefix_len(prefixes[order[k - 1]], prefixes[order[k]], hint=lcp[k - 1])
    _, groups = _best_groups(lcp, 0, len(order))
    return [(sorted(order[k] for k in group), num_shared) for group, num_shared in groups]


def _best_groups(lcp: list[int], lo: int, hi: int) -> tuple[int, list[tuple[list[int], int]]]:
    """(spared reads, groups of sorted positions) for the rows sorted lo..hi-1, the subtree of the trie node where
    they part (depth: their common prefix length). Recursion depth <= number of rows."""
    if hi - lo < 2:
        return 0, []
    depth = min(lcp[lo + 1 : hi])
    cuts = [lo, *(k for k in range(lo + 1, hi) if lcp[k] == depth), hi]
    spared, kept, joining, gain = 0, [], [], 0
    for a, b in pairwise(cuts):  # the node's subtrees, and its rows ending there (one each)
        sub_spared, sub_groups = _best_groups(lcp, a, b)
        spared += sub_spared
        if depth * (b - a) > sub_spared:  # these rows spare more in a group sharing `depth` items
            joining.append((range(a, b), sub_groups))
            gain += depth * (b - a) - sub_spared
        else:
            kept += sub_groups
    if depth > 0 and gain > depth:  # a group's first row spares nothing
        return spared + gain - depth, [([k for rows, _ in joining for k in rows], depth), *kept]
    return spared, kept + [g for _, sub_groups in joining for g in sub_groups]


def _common_prefix_len(a: Sequence[int], b: Sequence[int], hint: int) -> int:
    """Length of the common prefix of a and b, by slice comparisons (C loops, and shared pages are the same int
    objects); `hint` only speeds it up: neighbours in sorted order usually part where the previous pair did."""
    n = min(len(a), len(b))
    k = min(hint, n)
    lo, hi = (k, n + 1) if a[:k] == b[:k] else (0, k)  # a[:lo] == b[:lo]; a[:hi] != b[:hi] (n + 1: past the end)
    if lo == k and (k == n or a[k] != b[k]):
        return k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class _Levels:
    """Builds a CascadeStep slot by slot: each level's page tables are collected per request, then laid out by
    paged_kv_tables."""

    def __init__(self, page_size: int):
        self.page_size = page_size
        self.order, self.in_group, self.shared_qo_indptr = [], [], [0]
        self.shared_tables, self.shared_kv_lens, self.own_tables, self.own_kv_lens = [], [], [], []

    def add_group(self, pages: Sequence[int], kv_len: int, num_rows: int) -> None:
        """A shared-level request: `num_rows` slots attending to the first kv_len tokens of `pages`."""
        self.shared_qo_indptr.append(self.shared_qo_indptr[-1] + num_rows)
        self.shared_tables.append(pages)
        self.shared_kv_lens.append(kv_len)

    def add_row(self, row: int, own_pages: Sequence[int], own_kv_len: int, in_group: bool) -> None:
        """The next slot: batch row `row`, whose own level is the first own_kv_len tokens of `own_pages`."""
        self.order.append(row)
        self.in_group.append(in_group)
        self.own_tables.append(own_pages)
        self.own_kv_lens.append(own_kv_len)

    def done(self, num_groups: int, num_saved_tokens: int) -> CascadeStep:
        shared = paged_kv_tables(self.shared_tables, self.shared_kv_lens, self.page_size)
        own = paged_kv_tables(self.own_tables, self.own_kv_lens, self.page_size)
        return CascadeStep(self.page_size, self.order, self.in_group, self.shared_qo_indptr, shared.kv_indptr,
                           shared.kv_indices, shared.kv_last_page_len, own.kv_indptr, own.kv_indices,
                           own.kv_last_page_len, num_groups=num_groups, num_saved_tokens=num_saved_tokens)
