"""plan_step, the one place that picks each step's execution path, without torch: hand-worked steps for each path and
each reason to fall back to eager."""
from __future__ import annotations

import pytest

from braidinfer.attention.cascade_plan import plan_cascade
from braidinfer.step_plan import (
    Capabilities,
    DecodeGraphSizes,
    PathConfig,
    PrefillGraphSizes,
    StepFacts,
    plan_step,
)

PAGE_SIZE, SCRATCH = 4, 1000
FLASHINFER = PathConfig("flashinfer", PAGE_SIZE, cascade_min_saved_tokens=8)
DECODE = DecodeGraphSizes(batch_sizes=(1, 2, 4, 8), max_num_kv_indices=64, scratch_page=SCRATCH,
                          cascade_batch_sizes=frozenset({2, 4, 8}), triton_batch_sizes=frozenset({1, 2}))
PREFILL = PrefillGraphSizes(token_counts=(16, 32, 64))
GRAPHS = Capabilities(DECODE, PREFILL)


def _decode(kv_lens, tables=None):
    """A decode-only step: sequence i's KV holds kv_lens[i] tokens, new one included, in pages of its own."""
    if tables is None:
        tables = [list(range(100 * i, 100 * i + -(-n // PAGE_SIZE))) for i, n in enumerate(kv_lens)]
    return StepFacts([1] * len(kv_lens), kv_lens, tables)


def test_without_graphs_every_step_runs_eagerly_on_its_backend():
    prefill = StepFacts([5, 1], [5, 9], [[1, 2], [3, 4, 5]])
    for facts, backend, attention in [(_decode([3, 9]), "torch", "torch"), (prefill, "torch", "torch"),
                                      (_decode([3, 9]), "flashinfer", "flashinfer-decode"),
                                      (prefill, "flashinfer", "flashinfer-prefill")]:
        path = plan_step(facts, PathConfig(backend, PAGE_SIZE), Capabilities())
        print(path)
        assert (path.kind, path.attention, path.num_rows) == ("eager", attention, sum(facts.num_new_tokens))
        assert path.cascade is None and "no CUDA graphs" in path.reason


@pytest.mark.parametrize(("num_seqs", "bucket", "attention"),
                         [(1, 1, "triton-decode"), (2, 2, "triton-decode"), (3, 4, "flashinfer-decode"),
                          (5, 8, "flashinfer-decode"), (8, 8, "flashinfer-decode")])
def test_a_decode_step_replays_the_smallest_bucket_that_holds_it(num_seqs, bucket, attention):
    path = plan_step(_decode([7] * num_seqs), FLASHINFER, GRAPHS)  # nothing shared: no cascade
    print(path)
    assert (path.kind, path.num_rows, path.attention) == ("decode_graph", bucket, attention)


def test_a_decode_step_that_fits_no_graph_runs_eagerly():
    path = plan_step(_decode([7] * 9), FLASHINFER, GRAPHS)
    assert (path.kind, path.attention, path.num_rows) == ("eager", "flashinfer-decode", 9)
    assert "largest decode graph (8 rows)" in path.reason
    # 3 sequences of 9, 4 and 20 tokens: 3 + 1 + 5 pages, and one padding row's scratch page = 10 page indices.
    facts = _decode([9, 4, 20])
    fits = DecodeGraphSizes((1, 2, 4, 8), 10, SCRATCH, triton_batch_sizes=frozenset({1, 2}))
    assert plan_step(facts, FLASHINFER, Capabilities(fits, PREFILL)).kind == "decode_graph"
    tight = DecodeGraphSizes((1, 2, 4, 8), 9, SCRATCH)
    path = plan_step(facts, FLASHINFER, Capabilities(tight, PREFILL))
    assert path.kind == "eager" and "span 10 pages" in path.reason
    # One decoding sequence too large for the decode graphs runs eagerly, not through a prefill graph.
    path = plan_step(_decode([40]), FLASHINFER, Capabilities(tight, PREFILL))
    assert (path.kind, path.attention) == ("eager", "flashinfer-decode")


def test_sequences_sharing_enough_prefix_pages_replay_the_cascade_graph():
    # Three sequences share pages 1, 2 (8 tokens) and each has one page of its own: cascade spares 2 * 8 reads.
    tables = [[1, 2, 10], [1, 2, 11], [1, 2, 12]]
    kv_lens = [9, 10, 12]
    path = plan_step(_decode(kv_lens, tables), FLASHINFER, GRAPHS)
    print(path)
    assert (path.kind, path.attention, path.num_rows) == ("cascade_graph", "flashinfer-cascade", 4)
    assert path.cascade == plan_cascade(tables, kv_lens, PAGE_SIZE, 4, SCRATCH, 0)
    assert path.cascade.num_groups == 1 and path.cascade.num_saved_tokens == 16
    # Below the threshold, or with cascade off, or in a bucket without a cascade graph: the plain graph.
    for config, graphs in [(PathConfig("flashinfer", PAGE_SIZE, 17), DECODE),
                           (FLASHINFER, DecodeGraphSizes((1, 2, 4, 8), 64, SCRATCH))]:
        path = plan_step(_decode(kv_lens, tables), config, Capabilities(graphs, PREFILL))
        assert (path.kind, path.num_rows, path.cascade) == ("decode_graph", 4, None)
    # Levels larger than the graphs' buffers (and so is the plain step: 9 page indices): eager.
    small = DecodeGraphSizes((1, 2, 4, 8), 2, SCRATCH, cascade_batch_sizes=frozenset({2, 4, 8}))
    assert plan_step(_decode(kv_lens, tables), FLASHINFER, Capabilities(small, PREFILL)).kind == "eager"


def test_one_sequences_short_prefill_replays_a_prefill_graph():
    for num_tokens, rows in [(2, 16), (16, 16), (17, 32), (64, 64)]:
        path = plan_step(StepFacts([num_tokens], [100 + num_tokens], [list(range(30))]), FLASHINFER, GRAPHS)
        assert (path.kind, path.attention, path.num_rows) == ("prefill_graph", "flashinfer-prefill", rows)
    path = plan_step(StepFacts([65], [65], [list(range(17))]), FLASHINFER, GRAPHS)
    print(path)
    assert (path.kind, path.attention, path.num_rows) == ("eager", "flashinfer-prefill", 65)
    assert "largest prefill graph (64 rows)" in path.reason
    # Two sequences, one prefilling: eager, whatever the sizes.
    path = plan_step(StepFacts([3, 1], [3, 8], [[1], [2, 3]]), FLASHINFER, GRAPHS)
    assert (path.kind, path.attention, path.num_rows) == ("eager", "flashinfer-prefill", 4)
    # A one-sequence decode step with prefill graphs only (no decode graphs) replays the smallest prefill graph.
    path = plan_step(_decode([9]), FLASHINFER, Capabilities(prefill_graphs=PREFILL))
    assert (path.kind, path.num_rows) == ("prefill_graph", 16)
