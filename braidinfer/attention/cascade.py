"""Cascade decode: when running sequences share prefix pages, their decode attention reads the shared pages once per
group instead of once per sequence.

The prefix cache hands a shared prefix out as the very same physical pages, so sharing shows in the page tables: rows
whose tables start with the same page ids. `plan_cascade` (plain Python) finds the groups and splits each row's
attention in two levels, `FlashInferCascadeDecode` runs them in a form a CUDA graph can capture:

- shared level: one FlashInfer paged *prefill* "request" per group: the group's queries (contiguous rows) against the
  group's shared full pages, non-causal. The prefill kernel loads each KV tile once per query tile, where decode
  loads it once per row; in CUDA-graph mode the planner sizes query tiles for its worst case (every group one row),
  16 packed rows (rows x GQA group size), so a group of 64 Qwen3 rows reads its shared KV 8 times instead of 64.
- own level: the paged decode kernel over each row's remaining pages (always >= 1: the last page, which the new
  token is written to, is never shared).
- both return their log-sum-exp (base 2) and `flashinfer.merge_state_in_place` merges them, masked to the rows that
  have a shared level; rows without sharing attend through the own level alone (all their pages).

Why not `MultiLevelCascadeAttentionWrapper`: it runs every level through `BatchPrefillWithPagedKVCacheWrapper` with
backend "auto", which on H100 is FA3, whose scheduler (PrefillSM90Plan) never splits the KV of a request: one group
over an 8k-token prefix would run on num_kv_heads CTAs per query tile. Here the shared level pins backend "fa2",
whose CUDA-graph scheduler always splits KV into chunks that fill the SMs, and the own level is the same decode
kernel as plain decode. Each level is a fixed-size FlashInfer graph wrapper, which also fixes how padding works:

- Rows are permuted into group order inside the attention (`index_select`, capturable) through static buffers:
  groups first, then rows without a group, then the bucket's padding rows; the output goes back to batch order.
- The shared level always has `batch_size` slots and `batch_size` query rows in all: the real groups, one slot
  holding every ungrouped and padding row (attending to the scratch page; its result is masked out of the merge), and
  empty slots with 0 query rows over the scratch page. Evidence from FlashInfer 0.7.2's scheduler.cuh
  (PrefillSplitQOKVIndptr, PrefillPlanImpl): a request with 0 query rows gets 0 query tiles, hence no work item and no
  merge rows; in CUDA-graph mode the query tile (from total_num_rows - batch_size + 1), the grid (padded_batch_size)
  and the partial-state buffers depend only on the total rows and the slot count, both `batch_size` here, so every
  grouping replays the captured launch, and `block_valid_mask` idles the unused CTAs; the KV chunk size is read from
  the device. No slot has 0 KV pages (the scheduler clamps to 1 page but nothing shows that the kernels do).
- Padding rows of the own level are one token in the scratch page, as in `pad_decode_batch`.

Static buffers, shared by all buckets and sized for the largest, b_max: per level b_max + 1 offsets and b_max
last-page lengths (a bucket of b rows has at most b groups), `max_num_kv_indices + b_max` page indices (a step whose
plain page tables fit `max_num_kv_indices` always fits both levels), and the row permutation. FlashInfer adds 8 MiB
of device and 8 MiB of pinned host workspace per level and bucket. The fa2 prefill module is not in the JIT cache
the plain path warms: it compiles on first use (~100 s).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

from braidinfer.attention.flashinfer_backend import FlashInferAttention
from braidinfer.attention.metadata import AttentionMetadata

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
        step.add_group(page_tables[rows[0]][:num_shared], page_size, len(rows))
        for row in rows:
            step.add_row(row, page_tables[row][num_shared : num_used[row]], kv_lens[row], in_group=True)
    grouped = {row for rows, _ in groups for row in rows}
    loners = [row for row in range(num_seqs) if row not in grouped]
    if loners or num_seqs < batch_size:  # one slot for all of them, masked out of the merge
        step.add_group([scratch_page], 1, len(loners) + batch_size - num_seqs)
        for row in loners:
            step.add_row(row, page_tables[row][: num_used[row]], kv_lens[row], in_group=False)
        for row in range(num_seqs, batch_size):
            step.add_row(row, [scratch_page], 1, in_group=False)
    while len(step.shared_kv_last_page_len) < batch_size:
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
    """Builds a CascadeStep slot by slot."""

    def __init__(self, page_size: int):
        self.page_size = page_size
        self.order, self.in_group = [], []
        self.shared_qo_indptr, self.shared_kv_indptr, self.shared_kv_indices, self.shared_kv_last_page_len = \
            [0], [0], [], []
        self.own_kv_indptr, self.own_kv_indices, self.own_kv_last_page_len = [0], [], []

    def add_group(self, pages: Sequence[int], last_page_len: int, num_rows: int) -> None:
        self.shared_qo_indptr.append(self.shared_qo_indptr[-1] + num_rows)
        self.shared_kv_indices.extend(pages)
        self.shared_kv_indptr.append(len(self.shared_kv_indices))
        self.shared_kv_last_page_len.append(last_page_len)

    def add_row(self, row: int, own_pages: Sequence[int], kv_len: int, in_group: bool) -> None:
        self.order.append(row)
        self.in_group.append(in_group)
        self.own_kv_indices.extend(own_pages)
        self.own_kv_indptr.append(len(self.own_kv_indices))
        self.own_kv_last_page_len.append((kv_len - 1) % self.page_size + 1)

    def done(self, num_groups: int, num_saved_tokens: int) -> CascadeStep:
        return CascadeStep(**vars(self), num_groups=num_groups, num_saved_tokens=num_saved_tokens)


@dataclass(frozen=True)
class _CascadeBuffers:
    """Device arrays that captured cascade steps read, shared by every bucket (one graph replays at a time);
    `FlashInferCascadeDecode.plan` refills them before each replay."""

    rows: torch.Tensor  # [3, max_batch] int32: per bucket, [:, :b] = slot order, rank, new-token position
    in_group: torch.Tensor  # [max_batch] bool, by slot
    shared_qo_indptr: torch.Tensor  # [max_batch + 1] int32
    shared_kv_indptr: torch.Tensor  # [max_batch + 1] int32
    shared_kv_indices: torch.Tensor  # [max_num_kv_indices + max_batch] int32
    shared_kv_last_page_len: torch.Tensor  # [max_batch] int32
    own_kv_indptr: torch.Tensor  # [max_batch + 1] int32
    own_kv_indices: torch.Tensor  # [max_num_kv_indices + max_batch] int32
    own_kv_last_page_len: torch.Tensor  # [max_batch] int32

    @classmethod
    def allocate(cls, max_batch: int, max_num_kv_indices: int, device: torch.device) -> _CascadeBuffers:
        def zeros(*shape, dtype=torch.int32):
            return torch.zeros(shape, dtype=dtype, device=device)

        b, n = max_batch, max_num_kv_indices + max_batch
        return cls(zeros(3, b), zeros(b, dtype=torch.bool), zeros(b + 1), zeros(b + 1), zeros(n), zeros(b),
                   zeros(b + 1), zeros(n), zeros(b))


def cascade_decoders(backend: FlashInferAttention, batch_sizes: Sequence[int],
                     max_num_kv_indices: int) -> dict[int, FlashInferCascadeDecode]:
    """A CUDA-graph cascade decode attention for each batch size, over one set of static buffers.
    `max_num_kv_indices`: most page indices one step's (plain) page tables may hold."""
    buffers = _CascadeBuffers.allocate(max(batch_sizes), max_num_kv_indices, backend.kv_cache.device)
    return {b: FlashInferCascadeDecode(backend, b, buffers) for b in batch_sizes}


class FlashInferCascadeDecode:
    """Decode attention for exactly `batch_size` rows (one new token each) in two levels, shared pages once per group
    and each row's own pages (see the module docstring); a CUDA graph can capture it. `plan(step)` (host side, never
    captured) rewrites the static buffers and both levels' FlashInfer plans before each replay. Same calls as
    FlashInferGraphDecode (`__call__` writes the new K/V, `attend` does not); the metadata argument is not read."""

    def __init__(self, backend: FlashInferAttention, batch_size: int, buffers: _CascadeBuffers):
        import flashinfer

        b = self.batch_size = batch_size
        self.kv_cache = backend.kv_cache
        self.page_size = backend.page_size
        self._dims = (backend.num_qo_heads, backend.num_kv_heads, backend.head_dim, backend.page_size)
        self._scale = backend.scale
        self._rows = buffers.rows[:, :b]
        self._order, self._rank, self._positions = self._rows.unbind(0)  # (b,) each
        self._in_group = buffers.in_group[:b]
        # Both levels share the backend's float workspace: they run one after the other on one stream.
        self._shared = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            backend.workspace, "HND", use_cuda_graph=True, qo_indptr_buf=buffers.shared_qo_indptr[: b + 1],
            paged_kv_indptr_buf=buffers.shared_kv_indptr[: b + 1], paged_kv_indices_buf=buffers.shared_kv_indices,
            paged_kv_last_page_len_buf=buffers.shared_kv_last_page_len[:b], backend="fa2")
        own_indptr, own_last_page_len = buffers.own_kv_indptr[: b + 1], buffers.own_kv_last_page_len[:b]
        self._own = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            backend.workspace, kv_layout="HND", use_cuda_graph=True, paged_kv_indptr_buffer=own_indptr,
            paged_kv_indices_buffer=buffers.own_kv_indices, paged_kv_last_page_len_buffer=own_last_page_len)
        self._own_pages = (buffers.own_kv_indices, own_indptr, own_last_page_len)  # the new token's page is own
        self._max_num_kv_indices = len(buffers.own_kv_indices)
        self._append_kv = flashinfer.append_paged_kv_cache
        self._merge = flashinfer.merge_state_in_place

    def plan(self, step: CascadeStep) -> None:
        """Loads the next replay's step (from plan_cascade with this batch size and the pool's page size). Must run
        outside capture, before each replay (or the eager warm-up run)."""
        b = self.batch_size
        if step.batch_size != b or step.page_size != self.page_size:
            raise ValueError(f"a step of {step.batch_size} rows and page size {step.page_size} for a cascade decode "
                             f"of {b} rows and page size {self.page_size}")
        num_shared, num_own = len(step.shared_kv_indices), len(step.own_kv_indices)
        if max(num_shared, num_own) > self._max_num_kv_indices:
            raise ValueError(f"{num_shared} shared / {num_own} own page indices exceed the buffers' "
                             f"{self._max_num_kv_indices}")
        # One host-to-device copy; the wrappers take the small CSR arrays from the host (they plan on them there)
        # and the page indices from the device (a host tensor there would be copied synchronously).
        host = torch.tensor([*step.order, *step.rank(), *step.new_token_positions(), *step.in_group,
                             *step.shared_kv_indices, *step.own_kv_indices], dtype=torch.int32)
        dev = host.to(self.kv_cache.device, non_blocking=True)
        self._rows.copy_(dev[: 3 * b].view(3, b))
        self._in_group.copy_(dev[3 * b : 4 * b])
        shared_indices, own_indices = dev[4 * b :].split([num_shared, num_own])
        dtype = self.kv_cache.dtype
        kwargs = {"q_data_type": dtype, "kv_data_type": dtype, "sm_scale": self._scale}

        def host_i32(values):
            return torch.tensor(values, dtype=torch.int32)

        self._own.plan(host_i32(step.own_kv_indptr), own_indices, host_i32(step.own_kv_last_page_len), *self._dims,
                       **kwargs)
        self._shared.plan(host_i32(step.shared_qo_indptr), host_i32(step.shared_kv_indptr), shared_indices,
                          host_i32(step.shared_kv_last_page_len), *self._dims, causal=False, **kwargs)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata):
        """q: [b, num_qo_heads, head_dim]; k, v: [b, num_kv_heads, head_dim] -> out: [b, num_qo_heads, head_dim],
        rows in batch order. Writes the new K/V into the pool first."""
        # Row i's new K/V go to request rank[i] of the own level, at its new-token position there: the same slot as
        # meta.slot_mapping[i] (padding rows: offset 0 of the scratch page).
        self._append_kv(k, v, self._rank, self._positions, self.kv_cache[layer], *self._own_pages, kv_layout="HND")
        return self.attend(layer, q, meta)

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention only: the new K/V are already in the pool (the caller wrote them at the step's slots)."""
        cache = self.kv_cache[layer]  # (pages, 2, kvh, ps, hd)
        q = q.index_select(0, self._order)  # (b, qh, hd) in slot order: each group's rows contiguous
        out, lse = self._own.run(q, cache, return_lse=True)  # (b, qh, hd), (b, qh) base-2 log-sum-exp
        shared_out, shared_lse = self._shared.run(q, cache, return_lse=True)
        self._merge(out, lse, shared_out, shared_lse, mask=self._in_group)  # rows without a group keep their own
        return out.index_select(0, self._rank)  # (b, qh, hd) in batch order
