"""The host side of CUDA-graph steps, without torch: buckets, and a decode step padded to its bucket with the scratch
page (against the eager backend's page tables: test_cuda_graphs_host.py; the graphs themselves:
tests/gpu/test_cuda_graphs.py)."""
from __future__ import annotations

import random

import pytest

from braidinfer.graph_buckets import (
    MAX_GRAPH_BATCH_SIZE,
    bucket_for,
    graph_batch_sizes,
    num_decode_kv_indices,
    pad_decode_batch,
)

PAGE_SIZES = [1, 4, 16, 16, 64]  # per random seed


@pytest.mark.parametrize("max_num_seqs", [1, 2, 3, 17, 64, 100, 1000])
def test_every_batch_up_to_the_largest_bucket_gets_the_smallest_bucket_that_holds_it(max_num_seqs):
    sizes = graph_batch_sizes(max_num_seqs)
    assert sizes == sorted(set(sizes)) and sizes[0] == 1
    assert sizes[-1] == min(max_num_seqs, MAX_GRAPH_BATCH_SIZE)
    for batch_size in range(1, sizes[-1] + 1):
        bucket = bucket_for(batch_size, sizes)
        assert bucket in sizes and bucket >= batch_size
        assert all(s < batch_size for s in sizes if s < bucket)
    assert bucket_for(sizes[-1] + 1, sizes) is None


def test_default_buckets():
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]


def test_padding_by_hand():
    # page_size 4. Sequence a adds position 5 (KV of 6 tokens: pages 7, 3; page 9 reserved ahead and unused);
    # sequence b adds position 0 (page 2). Padded to 4 rows with scratch page 10.
    step = pad_decode_batch([11, 12], [5, 0], [[7, 3, 9], [2]], page_size=4, batch_size=4, scratch_page=10)
    assert step.batch_size == 4
    assert step.input_ids == [11, 12, 0, 0]
    assert step.positions == [5, 0, 0, 0]
    assert step.kv_indptr == [0, 2, 3, 4, 5]
    assert step.kv_indices == [7, 3, 2, 10, 10]
    assert step.kv_last_page_len == [2, 1, 1, 1]


def test_no_padding_when_the_batch_fills_its_bucket():
    step = pad_decode_batch([5], [16], [[1, 2, 3]], page_size=16, batch_size=1, scratch_page=99)
    assert step.kv_indptr == [0, 2] and step.kv_indices == [1, 2] and step.kv_last_page_len == [1]


def test_a_batch_larger_than_its_bucket_is_refused():
    with pytest.raises(ValueError, match="do not fit"):
        pad_decode_batch([1, 2], [0, 0], [[0], [1]], page_size=4, batch_size=1, scratch_page=5)


def _random_decode(rng: random.Random, num_seqs: int, page_size: int, num_pages: int):
    """Decode rows over distinct random pages (page num_pages is the scratch page, never in a table)."""
    pages = list(range(num_pages))
    rng.shuffle(pages)
    positions, tables = [], []
    for _ in range(num_seqs):
        pos = rng.randrange(0, 6 * page_size)
        n = pos // page_size + 1 + rng.randrange(0, 2)  # sometimes a spare page reserved ahead
        positions.append(pos)
        tables.append([pages.pop() for _ in range(n)])
    return [rng.randrange(1000) for _ in range(num_seqs)], positions, tables


@pytest.mark.parametrize("seed", range(5))
def test_padding_rows_hold_one_token_in_the_scratch_page_only(seed):
    rng, page_size, scratch = random.Random(seed), PAGE_SIZES[seed], 300
    ids, positions, tables = _random_decode(rng, rng.randrange(1, 40), page_size, num_pages=scratch)
    bucket = bucket_for(len(ids), graph_batch_sizes(64))
    step = pad_decode_batch(ids, positions, tables, page_size, bucket, scratch)
    rows = [step.kv_indices[step.kv_indptr[r] : step.kv_indptr[r + 1]] for r in range(bucket)]
    assert len(step.kv_indices) == step.kv_indptr[-1]
    for r in range(len(ids), bucket):
        assert rows[r] == [scratch] and step.kv_last_page_len[r] == 1
        assert step.positions[r] == 0 and step.input_ids[r] == 0
    assert all(scratch not in row for row in rows[: len(ids)])


@pytest.mark.parametrize("seed", range(5))
def test_append_positions_follow_from_the_page_tables(seed):
    """Where each row's new K/V goes, derived from the planned page tables, is the row's position (0 for padding:
    the scratch page's first slot); the slot mapping the fused kernel writes through names the same slot."""
    rng, page_size = random.Random(seed), PAGE_SIZES[seed]
    ids, positions, tables = _random_decode(rng, rng.randrange(1, 30), page_size, num_pages=300)
    step = pad_decode_batch(ids, positions, tables, page_size, bucket_for(len(ids), graph_batch_sizes(32)), 300)
    from_tables = [(step.kv_indptr[r + 1] - step.kv_indptr[r] - 1) * page_size + step.kv_last_page_len[r] - 1
                   for r in range(len(step.kv_last_page_len))]
    assert from_tables == step.positions
    for r, pos in enumerate(step.positions):
        table = tables[r] if r < len(ids) else [300]
        assert step.slot_mapping[r] == table[pos // page_size] * page_size + pos % page_size


@pytest.mark.parametrize("seed", range(5))
def test_the_page_count_of_a_padded_step_is_known_before_padding_it(seed):
    """num_decode_kv_indices (what plan_step checks against the graphs' buffers) counts what pad_decode_batch lays
    out."""
    rng, page_size = random.Random(seed), PAGE_SIZES[seed]
    ids, positions, tables = _random_decode(rng, rng.randrange(1, 30), page_size, num_pages=300)
    bucket = bucket_for(len(ids), graph_batch_sizes(32))
    step = pad_decode_batch(ids, positions, tables, page_size, bucket, 300)
    assert num_decode_kv_indices([p + 1 for p in positions], page_size, bucket) == len(step.kv_indices)
