"""The per-step description of a batch that every attention backend reads; built once per step by the runner.

Also the one place that lays page tables out in FlashInfer's CSR form (`paged_kv_layout`, `paged_kv_tables`), for the
eager plan, the CUDA-graph decode and prefill, and both levels of cascade decode. Plain Python: torch is only named in
type annotations here.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SeqSpan:
    """One sequence's part of a flattened batch.

    Its new tokens are rows [q_start, q_start + q_len) of the batch; after this step its KV covers `context_len`
    tokens (the cached/computed ones plus the q_len new ones), stored in the pages of `page_table` in order.
    `generated`: the new tokens all follow the prompt (the engine sampled them: decoding), as opposed to prompt
    tokens, however few are left to compute after a prefix-cache hit or a chunk boundary.
    """

    q_start: int
    q_len: int
    context_len: int
    page_table: torch.Tensor  # [num_pages] int64, on the KV cache's device
    generated: bool = False


@dataclass(frozen=True)
class AttentionMetadata:
    """Where the step's new keys and values go and which cached tokens each query attends to."""

    spans: list[SeqSpan]
    slot_mapping: torch.Tensor  # [T] int64: page * page_size + offset of each new token's KV slot
    num_tokens: int

    @property
    def is_decode_only(self) -> bool:
        return all(s.q_len == 1 for s in self.spans)


class AttentionBackend(Protocol):
    """What the runner calls on an attention backend (TorchAttention, FlashInferAttention): `plan(meta)` once per
    step before the forward, then per layer `__call__` (write the new K/V, attend) or `attend`."""

    kv_cache: torch.Tensor  # [layers, pages, 2, kv_heads, page_size, head_dim]

    def plan(self, meta: AttentionMetadata) -> None: ...

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor: ...

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor: ...


@dataclass(frozen=True)
class PagedKVTables:
    """Page tables in FlashInfer's CSR form: request i's KV is in pages kv_indices[kv_indptr[i]:kv_indptr[i + 1]],
    the last of them holding kv_last_page_len[i] tokens."""

    kv_indptr: list[int]  # [B + 1], from 0
    kv_indices: list[int]  # [kv_indptr[-1]]
    kv_last_page_len: list[int]  # [B], in [1, page_size]


def paged_kv_layout(kv_lens: Sequence[int], page_size: int) -> tuple[list[int], list[int]]:
    """(kv_indptr [B + 1], kv_last_page_len [B]) of requests whose KV holds kv_lens[i] >= 1 tokens each, in
    ceil(kv_lens[i] / page_size) pages: the CSR arrays without the page ids (for page tables kept on the device)."""
    kv_indptr, kv_last_page_len = [0], []
    for kv_len in kv_lens:
        if kv_len < 1:
            raise ValueError(f"a request's KV must hold at least one token, got {kv_len}")
        num_pages = (kv_len - 1) // page_size + 1
        kv_indptr.append(kv_indptr[-1] + num_pages)
        kv_last_page_len.append(kv_len - (num_pages - 1) * page_size)
    return kv_indptr, kv_last_page_len


def paged_kv_tables(page_tables: Sequence[Sequence[int]], kv_lens: Sequence[int], page_size: int) -> PagedKVTables:
    """The CSR page tables of requests whose KV holds kv_lens[i] tokens in the first pages of page_tables[i] (which
    may hold spare pages past those)."""
    if len(page_tables) != len(kv_lens):
        raise ValueError(f"{len(page_tables)} page tables for {len(kv_lens)} KV lengths")
    kv_indptr, kv_indices, kv_last_page_len = [0], [], []
    for table, kv_len in zip(page_tables, kv_lens):  # as paged_kv_layout, in the same loop (once per graph step)
        num_pages = (kv_len - 1) // page_size + 1
        if kv_len < 1 or len(table) < num_pages:
            raise ValueError(f"a request's KV must hold at least one token in its page table, got {kv_len} tokens "
                             f"in {len(table)} pages of {page_size}")
        kv_indices.extend(table[:num_pages])  # a slice: one C loop per request, not one per page
        kv_indptr.append(len(kv_indices))
        kv_last_page_len.append(kv_len - (num_pages - 1) * page_size)
    return PagedKVTables(kv_indptr, kv_indices, kv_last_page_len)
