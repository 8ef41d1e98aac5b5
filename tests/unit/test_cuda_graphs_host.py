"""CUDA-graph decode against the eager path on the host: a padded step's real rows are the eager FlashInfer plan's page
tables, and where graphs cannot run the runner is the eager one (the padding itself: test_graph_buckets.py; the graphs
themselves: tests/gpu/test_cuda_graphs.py)."""
from __future__ import annotations

import random

import pytest
import torch

from braidinfer.attention import AttentionMetadata, SeqSpan
from braidinfer.attention.flashinfer_backend import FlashInferGraphDecode, _host_arrays
from braidinfer.config import EngineConfig
from braidinfer.graph_buckets import bucket_for, graph_batch_sizes, pad_decode_batch
from braidinfer.models.config import ModelConfig
from braidinfer.models.qwen3 import Qwen3ForCausalLM
from braidinfer.runner import ModelRunner
from tests.unit.test_graph_buckets import PAGE_SIZES, _random_decode


@pytest.mark.parametrize("seed", range(5))
def test_real_rows_match_the_eager_backends_page_tables(seed):
    """The first B rows are what the eager FlashInfer plan builds for the same decode step (its CSR arrays and its
    page indices), so a replay attends over exactly the KV an eager step would."""
    rng, page_size = random.Random(seed), PAGE_SIZES[seed]
    ids, positions, tables = _random_decode(rng, rng.randrange(1, 20), page_size, num_pages=200)
    b = len(ids)
    step = pad_decode_batch(ids, positions, tables, page_size, bucket_for(b, graph_batch_sizes(64)), 200)
    spans = [SeqSpan(i, 1, pos + 1, torch.tensor(t)) for i, (pos, t) in enumerate(zip(positions, tables))]
    eager, _ = _host_arrays(AttentionMetadata(spans, torch.zeros(b, dtype=torch.int64), b), page_size)
    assert step.kv_indptr[: b + 1] == eager["kv_indptr"].tolist()
    assert step.kv_last_page_len[:b] == eager["kv_last_page_len"].tolist()
    assert step.positions[:b] == eager["positions"].tolist()
    num_pages = (eager["kv_indptr"][1:] - eager["kv_indptr"][:-1]).tolist()
    eager_indices = torch.cat([s.page_table[:n] for s, n in zip(spans, num_pages)]).tolist()
    assert step.kv_indices[: step.kv_indptr[b]] == eager_indices


def test_enforce_eager_is_accepted_with_every_backend_on_the_cpu():
    for backend in ("auto", "torch"):
        for eager in (True, False):
            assert EngineConfig(enforce_eager=eager, device="cpu", attention_backend=backend).enforce_eager is eager


def _tiny_qwen3() -> tuple[Qwen3ForCausalLM, ModelConfig]:
    cfg = ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return Qwen3ForCausalLM(cfg), cfg


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_without_flashinfer_graphs_are_not_captured_and_the_pool_is_unchanged(backend):
    """enforce_eager=False where the torch backend runs (here: the CPU) keeps the eager runner exactly: no graphs,
    no scratch page."""
    model, cfg = _tiny_qwen3()
    runner = ModelRunner(model, cfg, num_pages=10, page_size=4, device=torch.device("cpu"), dtype=torch.float32,
                         attention_backend=backend, enforce_eager=False, max_num_seqs=8)
    assert runner.graphs is None
    assert runner.kv_cache.shape[1] == 10


def test_the_runner_records_each_steps_path():
    """On the CPU every step runs eagerly on the torch backend, and the runner says so (and why) after each step."""
    from braidinfer.scheduler import ScheduledBatch
    from braidinfer.sequence import Sequence

    model, cfg = _tiny_qwen3()
    runner = ModelRunner(model, cfg, num_pages=10, page_size=4, device=torch.device("cpu"), dtype=torch.float32,
                         attention_backend="auto", enforce_eager=False, max_num_seqs=8)
    a, b = Sequence("a", [1, 2, 3, 4, 5], None, 4), Sequence("b", [6, 7, 8], None, 4)
    a.page_table, b.page_table = [0, 1], [2]
    assert runner.last_path is None
    logits, rows = runner.run(ScheduledBatch([a, b], [5, 3]))
    print(runner.last_path)
    assert (runner.last_path.kind, runner.last_path.attention, runner.last_path.num_rows) == ("eager", "torch", 8)
    assert "no CUDA graphs" in runner.last_path.reason
    assert rows == [0, 1] and logits.shape == (2, cfg.vocab_size)
    a.num_computed_tokens, b.num_computed_tokens = 5, 3
    a.token_ids.append(9)
    b.token_ids.append(9)
    batch = ScheduledBatch([a, b], [1, 1])
    assert runner.path_for(batch).num_rows == 2
    runner.run(batch)
    assert (runner.last_path.kind, runner.last_path.num_rows) == ("eager", 2)


@pytest.mark.gpu
def test_capture_replays_the_captured_call_over_its_static_buffers():
    """capture(fn): the warm-up runs fn once, the graph re-runs its kernels on whatever the static inputs then hold,
    and what the captured call returned is the static output each replay rewrites."""
    from braidinfer.cuda_graphs import capture

    x = torch.zeros(1000, device="cuda")
    calls = []

    def step():
        calls.append(True)  # host code runs at warm-up and capture only
        return torch.cumsum(x * 2, 0) + 1

    graph, out = capture(step, pool=torch.cuda.graph_pool_handle())
    assert len(calls) == 2
    for seed in range(3):
        new = torch.randn(1000, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        x.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, torch.cumsum(new * 2, 0) + 1)
    assert len(calls) == 2


@pytest.mark.parametrize("first_layer", [0, 2])
def test_graph_decode_copies_positions_once_a_step_at_the_first_appending_layer(first_layer):
    """The graph decode's KV append reads each row's position from a static buffer that the step's first appending
    layer fills from the step's positions: layer 0 where every layer appends, a later one where the layers before
    it write their K/V themselves (the fused kernels' path, which never calls the backend). Every step is copied, and
    only once (host side: the append and the attention recorded, not run)."""
    graph_decode = object.__new__(FlashInferGraphDecode)
    copies, appended = [], []
    kv_positions = torch.zeros(3, dtype=torch.int32)

    class Recorded(torch.Tensor):  # the static buffer, recording each copy into it
        def copy_(self, src, non_blocking=False):
            copies.append(src.tolist())
            return super().copy_(src, non_blocking)

    graph_decode.kv_cache = [torch.zeros(1)] * 4
    graph_decode._kv_positions = kv_positions.as_subclass(Recorded)
    graph_decode._copying_layer = None
    graph_decode._new_tokens = (torch.arange(3, dtype=torch.int32), graph_decode._kv_positions)
    graph_decode._pages = ()
    graph_decode._append_kv = lambda k, v, rows, positions, *rest, **kw: appended.append(positions.tolist())
    graph_decode.attend = lambda layer, q, meta: q
    for step in range(3):
        graph_decode._positions = torch.tensor([5, 9, 2]) + step
        for layer in range(first_layer, 4):
            graph_decode(layer, torch.zeros(1), None, None, None)
    assert copies == [[5 + s, 9 + s, 2 + s] for s in range(3)]
    assert appended == [[5 + s, 9 + s, 2 + s] for s in range(3) for _ in range(first_layer, 4)]
