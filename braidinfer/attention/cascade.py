"""Cascade decode on CUDA: when running sequences share prefix pages, their decode attention reads the shared pages
once per group instead of once per sequence. `braidinfer.attention.cascade_plan` (plain Python) finds the groups and
splits each row's attention in two levels (`plan_cascade`); `FlashInferCascadeDecode` runs them in a form a CUDA graph
can capture:

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

import torch

from braidinfer.attention.cascade_plan import CascadeStep, plan_cascade
from braidinfer.attention.flashinfer_backend import FlashInferAttention
from braidinfer.attention.metadata import AttentionMetadata

__all__ = ["CascadeStep", "FlashInferCascadeDecode", "cascade_decoders", "plan_cascade"]


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
        # Both levels share the backend's float workspace: they run one after the other on one stream. Each level's
        # plan has an int workspace that every batch size shares (plan() runs before each replay).
        self._shared = backend.plan_slot("cascade shared").wrapper(
            flashinfer.BatchPrefillWithPagedKVCacheWrapper, "HND", use_cuda_graph=True,
            qo_indptr_buf=buffers.shared_qo_indptr[: b + 1], paged_kv_indptr_buf=buffers.shared_kv_indptr[: b + 1],
            paged_kv_indices_buf=buffers.shared_kv_indices,
            paged_kv_last_page_len_buf=buffers.shared_kv_last_page_len[:b], backend="fa2")
        own_indptr, own_last_page_len = buffers.own_kv_indptr[: b + 1], buffers.own_kv_last_page_len[:b]
        self._own = backend.plan_slot("cascade own").wrapper(
            flashinfer.BatchDecodeWithPagedKVCacheWrapper, kv_layout="HND", use_cuda_graph=True,
            paged_kv_indptr_buffer=own_indptr, paged_kv_indices_buffer=buffers.own_kv_indices,
            paged_kv_last_page_len_buffer=own_last_page_len, **backend.decode_options)
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
