"""The host side of CUDA-graph steps: which captured size (bucket) serves a step, and its inputs padded to that size.
Plain Python, no torch (the graphs themselves: braidinfer.cuda_graphs).

A decode step of B sequences (one new token each) replays the graph of the smallest bucket >= B. Its rows past B are
padding: token 0 at position 0 over a one-page KV made of the scratch page, a page of the pool that the page manager
never hands out, so padding writes and reads only that page and its outputs are dropped. A one-sequence prefill of T
tokens replays the graph of the smallest token-count bucket >= T, its padding rows writing no KV.
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

from braidinfer.attention.metadata import paged_kv_tables

MAX_GRAPH_BATCH_SIZE = 512  # larger decode batches are GPU-bound: launch overhead no longer matters

PREFILL_GRAPH_TOKENS = (16, 32, 64, 128, 256)
"""Token-count buckets of the captured one-sequence prefills."""


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The buckets to capture: 1, 2, 4, 8, then every 8 up to 32, every 16 up to 128, every 32 beyond; none above
    min(max_num_seqs, MAX_GRAPH_BATCH_SIZE), which is itself a bucket so that every batch up to it has one."""
    top = min(max_num_seqs, MAX_GRAPH_BATCH_SIZE)
    sizes = [1, 2, 4, 8, *range(16, 33, 8), *range(48, 129, 16), *range(160, MAX_GRAPH_BATCH_SIZE + 1, 32)]
    return [b for b in sizes if b < top] + [top]


def bucket_for(batch_size: int, sizes: Sequence[int]) -> int | None:
    """The smallest bucket in `sizes` (ascending) holding batch_size rows, or None when none does."""
    i = bisect_left(sizes, batch_size)
    return sizes[i] if i < len(sizes) else None


@dataclass(frozen=True)
class PaddedDecode:
    """One decode step's inputs padded to a bucket of `batch_size` rows; page tables in FlashInfer's CSR form."""

    input_ids: list[int]  # [batch_size]
    positions: list[int]  # [batch_size]: each row's new token's position (its KV holds positions + 1 tokens)
    kv_indptr: list[int]  # [batch_size + 1]: row i's pages are kv_indices[kv_indptr[i]:kv_indptr[i + 1]]
    kv_indices: list[int]  # [kv_indptr[-1]]
    kv_last_page_len: list[int]  # [batch_size]: tokens in each row's last page, in [1, page_size]
    slot_mapping: list[int]  # [batch_size]: page * page_size + offset where each row's new token's KV goes

    @property
    def batch_size(self) -> int:
        return len(self.input_ids)


def pad_inputs(input_ids: Sequence[int], positions: Sequence[int], page_tables: Sequence[Sequence[int]],
               page_size: int, num_rows: int, pad_slot: int) -> tuple[list[int], list[int], list[int]]:
    """Token ids, positions and KV slots (page * page_size + offset, from page_tables[i]) of the rows, padded to
    `num_rows` rows of token 0 at position 0 whose KV goes to `pad_slot`."""
    num_pad = num_rows - len(input_ids)
    if num_pad < 0:
        raise ValueError(f"{len(input_ids)} rows do not fit {num_rows}")
    slots = [table[pos // page_size] * page_size + pos % page_size
             for pos, table in zip(positions, page_tables, strict=True)]
    return [*input_ids, *[0] * num_pad], [*positions, *[0] * num_pad], [*slots, *[pad_slot] * num_pad]


def pad_decode_batch(input_ids: Sequence[int], positions: Sequence[int], page_tables: Sequence[Sequence[int]],
                     page_size: int, batch_size: int, scratch_page: int) -> PaddedDecode:
    """The step where sequence i adds token input_ids[i] at positions[i], its KV in page_tables[i] (which may hold
    spare pages past the ones in use), padded with rows of one token at position 0 in `scratch_page`."""
    ids, padded_positions, slots = pad_inputs(input_ids, positions, page_tables, page_size, batch_size,
                                              scratch_page * page_size)
    num_pad = batch_size - len(input_ids)
    tables = paged_kv_tables([*page_tables, *[[scratch_page]] * num_pad], [pos + 1 for pos in padded_positions],
                             page_size)
    return PaddedDecode(ids, padded_positions, tables.kv_indptr, tables.kv_indices, tables.kv_last_page_len, slots)


def num_decode_kv_indices(kv_lens: Sequence[int], page_size: int, batch_size: int) -> int:
    """How many page indices pad_decode_batch lays out for sequences whose KV (new token included) holds kv_lens[i]
    tokens, padded to batch_size rows (one scratch page each)."""
    return sum((n - 1) // page_size + 1 for n in kv_lens) + batch_size - len(kv_lens)
