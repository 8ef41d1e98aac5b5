"""CUDA-graph decode (enforce_eager=False) against eager FlashInfer decode: the same greedy tokens and logprobs, the
same step computed with padding confined to the scratch page, and eager steps wherever a prefill is in the batch.

Graph and eager steps run different kernel configurations (GEMMs over a padded batch, FlashInfer's split-KV decode
that CUDA-graph mode always uses), so in bf16 they agree to rounding, not bit for bit: a logit of ~30 moves in steps of
0.25. Greedy paths may therefore part at a near-tie; they are compared up to there, and the parting must be a tie.
"""
from __future__ import annotations

import pytest
import torch

from braidinfer import LLM, SamplingParams
from braidinfer.config import EngineConfig
from braidinfer.engine import LLMEngine
from braidinfer.runner import ModelRunner
from tests.conftest import build_tiny_model
from tests.gpu.test_gpu_parity import NEEDS_FLASHINFER, SHAPES, _common_prefix, _prompts
from tests.support.numerics import assert_same_greedy

pytestmark = [pytest.mark.gpu, NEEDS_FLASHINFER]

# max_num_seqs 32: buckets 1, 2, 4, 8, 16, 24, 32; 3 sequences pad to 4, 17 to 24.
COMMON = dict(device="cuda", dtype="bfloat16", attention_backend="flashinfer", num_kv_pages=1024, max_num_seqs=32,
              progress=False)
LOGPROB_TOL = 0.5  # nats: two bf16 roundings of a logit near 30, and the shift they give the normaliser
REL_TOL = 0.03  # |graph - eager| / |eager| for a step's logits and new K/V (a wrong page or position gives ~1)


@pytest.fixture(scope="module", params=sorted(SHAPES))
def model_dir(request, tmp_path_factory, smollm_tokenizer):
    path = tmp_path_factory.mktemp(f"graphs-{request.param}")
    build_tiny_model(request.param, path, smollm_tokenizer, seed=11, **SHAPES[request.param])
    return str(path)


@pytest.fixture(scope="module")
def llms(model_dir):
    eager, graphs = LLM(model_dir, enforce_eager=True, **COMMON), LLM(model_dir, enforce_eager=False, **COMMON)
    assert eager.engine.runner.graphs is None and graphs.engine.runner.graphs is not None
    yield eager, graphs
    eager.close()
    graphs.close()


def _engine(model_dir: str) -> LLMEngine:
    """An engine with CUDA graphs driven step by step from the test (no engine thread), one step at a time (each
    step's tokens appended before the next is scheduled)."""
    return LLMEngine(EngineConfig(model=model_dir, enforce_eager=False, async_scheduling=False, **COMMON))


def test_asynchronous_scheduling_gives_the_same_tokens(model_dir):
    """Steps queued ahead of the host (input tokens read on the device) compute exactly what one-step-at-a-time
    scheduling computes: with length limits only, both run the same batches through the same graphs."""
    prompts = _prompts(seed=9, lengths=(9, 30, 70, 5, 300, 17))
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (20, 7, 33, 1, 16)]
    params.append(SamplingParams(temperature=0.9, top_k=50, seed=3, max_tokens=25, ignore_eos=True))
    outputs = {}
    for async_scheduling in (False, True):
        with LLM(model_dir, enforce_eager=False, async_scheduling=async_scheduling, **COMMON) as llm:
            outputs[async_scheduling] = [o.token_ids for o in llm.generate(prompts, params)]
            assert llm.engine.runner.graphs.num_replays > 0 and llm.engine.async_scheduling == async_scheduling
            assert llm.cache_stats()["in_use"] == 0
    assert [len(t) for t in outputs[True]] == [20, 7, 33, 1, 16, 25]
    assert outputs[True] == outputs[False]


def _assert_same_greedy(want, got, tol: float = LOGPROB_TOL) -> None:
    """got's greedy tokens equal want's up to a near-tie (if any), and so do the top logprobs at every step whose
    context is the same (tests/support/numerics.py; tests/unit/test_numeric_checks.py shows what it rejects)."""
    assert_same_greedy(want.token_ids, [dict(x.top) for x in want.logprobs],
                       got.token_ids, [dict(x.top) for x in got.logprobs], tol)


@pytest.mark.parametrize("num_seqs", [1, 3, 17])
def test_greedy_tokens_and_logprobs_equal_eager(llms, num_seqs):
    eager, graphs = llms
    prompts = _prompts(seed=num_seqs, lengths=[3 + 29 * i for i in range(num_seqs)])
    # Outputs of different lengths: the decode batch shrinks through several buckets as sequences finish.
    params = [SamplingParams(temperature=0, max_tokens=32 - (5 * i) % 12, logprobs=5, ignore_eos=True)
              for i in range(num_seqs)]
    replays = graphs.engine.runner.graphs.num_replays
    want, got = eager.generate(prompts, params), graphs.generate(prompts, params)
    assert graphs.engine.runner.graphs.num_replays > replays
    identical = sum(w.token_ids == g.token_ids for w, g in zip(want, got))
    print(f"{num_seqs} sequences: {identical} with identical greedy tokens")
    for w, g in zip(want, got):
        assert len(g.token_ids) == len(w.token_ids)
        _assert_same_greedy(w, g)


def test_steps_with_a_prefill_run_eagerly(model_dir):
    eng = _engine(model_dir)
    graphs = eng.runner.graphs
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    a, b = (eng.requests.sequence(p, params) for p in _prompts(lengths=(20, 40)))
    eng.add(a)
    eng.step()  # a's prefill
    assert graphs.num_replays == 0
    eng.step()  # a decodes alone
    assert graphs.num_replays == 1
    eng.add(b)
    eng.step()  # a decodes beside b's prefill: eager
    assert graphs.num_replays == 1 and a.num_output_tokens == 3 and b.num_output_tokens == 1
    eng.step()  # both decode
    assert graphs.num_replays == 2 and a.num_output_tokens == 4 and b.num_output_tokens == 2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


STEP_PROMPTS = {  # prompt lengths of one decode step's sequences; small buckets attend with kernels.decode_attention
    "1-long": [1500],  # its KV cut into slices that the kernel merges
    "3-short": [7, 20, 33],  # bucket 4
    "3-long": [100, 600, 1200],
    "17-short": [7 + 13 * i for i in range(17)],  # bucket 24: FlashInfer's decode
}


@pytest.mark.parametrize("prompts", sorted(STEP_PROMPTS))
def test_a_graph_step_computes_the_eager_step_and_writes_only_its_slots(model_dir, prompts):
    """One padded decode step through its graph and the same step eagerly, from the same page pool: the same logits,
    the same new K/V in the same slots, and no other change but (maybe: padding writes the same K/V each time) the
    scratch page's first slot."""
    lengths = STEP_PROMPTS[prompts]
    num_seqs = len(lengths)
    eng = _engine(model_dir)
    runner, pool = eng.runner, eng.runner.kv_cache
    scratch = eng.pages.num_pages
    assert pool.shape[1] == scratch + 1
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for prompt in _prompts(seed=5, lengths=lengths):
        eng.add(eng.requests.sequence(prompt, params))
    eng.step()  # every prefill
    batch = eng.scheduler.schedule()
    assert batch.num_new_tokens == [1] * num_seqs
    assert runner.graphs.attention[1].uses_triton_kernel and not runner.graphs.attention[24].uses_triton_kernel
    before = pool.clone()
    logits_graph, rows = runner.run(batch)
    assert runner.graphs.num_replays == 1
    pool_graph = pool.clone()
    pool.copy_(before)
    graphs, runner.graphs = runner.graphs, None  # the same step, eagerly
    logits_eager, rows_eager = runner.run(batch)
    runner.graphs = graphs
    assert rows == rows_eager == list(range(num_seqs))
    assert _rel(logits_graph, logits_eager) < REL_TOL

    ps = eng.config.page_size
    slots = {(s.page_table[s.num_computed_tokens // ps], s.num_computed_tokens % ps) for s in batch.seqs}
    changed_graph = (pool_graph != before).any(dim=5).any(dim=3).any(dim=2).any(dim=0)  # (pages, page_size)
    changed_eager = (pool != before).any(dim=5).any(dim=3).any(dim=2).any(dim=0)
    assert {tuple(x) for x in changed_eager.nonzero().tolist()} == slots
    assert slots <= {tuple(x) for x in changed_graph.nonzero().tolist()} <= slots | {(scratch, 0)}
    pages, offsets = (torch.tensor(x, device="cuda") for x in zip(*sorted(slots)))
    assert _rel(pool_graph[:, pages, :, :, offsets], pool[:, pages, :, :, offsets]) < REL_TOL


def test_sequences_sharing_a_chunk_decode_through_cascade_graphs(model_dir):
    """Twelve questions on one pinned 300-token chunk: their decode steps share 18 prefix pages, so with cascade on
    (threshold 0) they replay the cascade graphs, and give the plain graphs' greedy tokens and logprobs. Cascade
    merges two partial softmaxes in float32 where plain decode runs one, so the bf16 attention outputs round apart
    and the random model's logits (~30) move by a few bf16 steps: logprobs agree to 1 nat (seen: 0.6), where
    attending to a wrong page or missing the shared prefix changes the distribution entirely; and on average over
    every compared step much closer than that."""
    kw = dict(COMMON, enforce_eager=False)
    prefix = _prompts(seed=7, lengths=[300])[0]
    questions = _prompts(seed=8, lengths=[5 + 3 * i for i in range(12)])
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=5, ignore_eos=True)
    outputs = []
    for extra in (dict(cascade_min_saved_tokens=0), dict(cascade_decode=False)):
        with LLM(model_dir, **kw, **extra) as llm:
            chunk = llm.chunks.add(prefix)
            outputs.append(llm.generate(questions, params, chunks=chunk))
            graphs = llm.engine.runner.graphs
            assert (graphs.num_cascade_replays > 0) == (extra.get("cascade_decode", True))
    assert_cascade_like_plain(*outputs)


def assert_cascade_like_plain(cascade, plain) -> None:
    """Cascade decode's outputs against plain decode's, same questions (see the test above for the tolerances)."""
    print(f"cascade vs plain: {sum(c.token_ids == p.token_ids for c, p in zip(cascade, plain))}/{len(plain)} "
          "identical")
    diffs = []
    for p, c in zip(plain, cascade):
        assert len(c.token_ids) == len(p.token_ids)
        _assert_same_greedy(p, c, tol=1.0)
        for step in range(min(_common_prefix(p.token_ids, c.token_ids) + 1, len(p.token_ids))):
            want, got = dict(p.logprobs[step].top), dict(c.logprobs[step].top)
            diffs += [abs(want[t] - got[t]) for t in want.keys() & got.keys()]
    print(f"mean |logprob difference| {sum(diffs) / len(diffs):.3f} over {len(diffs)}")
    assert sum(diffs) / len(diffs) < 0.15


@pytest.mark.parametrize("new_tokens", [1, 37, 250])
def test_a_prefill_through_its_graph_computes_the_eager_step(model_dir, new_tokens):
    """One sequence's prefill after a cached 96-token prefix (4 + new_tokens tokens: padded to a bucket of 16, 64 or
    256 rows) through its captured graph and eagerly, from the same page pool: the same logits, the same K/V in the
    same slots, nothing else written (padding rows write no KV)."""
    eng = _engine(model_dir)
    runner, pool, ps = eng.runner, eng.runner.kv_cache, eng.config.page_size
    prefix = _prompts(seed=9, lengths=[100])[0]
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    eng.add(eng.requests.sequence(prefix, params))
    while eng.has_work():
        eng.step()
    seq = eng.requests.sequence(prefix + _prompts(seed=10, lengths=[new_tokens])[0], params)
    eng.add(seq)
    batch = eng.scheduler.schedule()
    assert batch.seqs == [seq] and batch.num_new_tokens == [new_tokens + 4] and seq.num_computed_tokens == 96
    before = pool.clone()
    replays = runner.prefill_graphs.num_replays
    logits_graph, rows = runner.run(batch)
    assert runner.prefill_graphs.num_replays == replays + 1
    pool_graph = pool.clone()
    pool.copy_(before)
    graphs, runner.prefill_graphs = runner.prefill_graphs, None  # the same step, eagerly
    logits_eager, rows_eager = runner.run(batch)
    runner.prefill_graphs = graphs
    assert rows == rows_eager == [0]
    assert _rel(logits_graph, logits_eager) < REL_TOL

    slots = {(seq.page_table[p // ps], p % ps) for p in range(96, seq.num_tokens)}
    changed_graph = (pool_graph != before).any(dim=5).any(dim=3).any(dim=2).any(dim=0)  # (pages, page_size)
    changed_eager = (pool != before).any(dim=5).any(dim=3).any(dim=2).any(dim=0)
    assert {tuple(x) for x in changed_eager.nonzero().tolist()} == slots
    assert {tuple(x) for x in changed_graph.nonzero().tolist()} == slots
    pages, offsets = (torch.tensor(x, device="cuda") for x in zip(*sorted(slots)))
    assert _rel(pool_graph[:, pages, :, :, offsets], pool[:, pages, :, :, offsets]) < REL_TOL


def test_the_logits_run_at_every_bucket_while_the_engine_loads(model_dir, monkeypatch):
    """The eager logits run once at every decode bucket's row count and at one row fewer while the engine loads, so
    that the kernels their projection picks by row count compile then, not in the first steps that need them."""
    rows = []
    init = ModelRunner.__init__

    def spying_init(self, model, *args, **kwargs):
        compute = model.compute_logits

        def spy(hidden):
            rows.append(hidden.shape[0])
            return compute(hidden)

        model.compute_logits = spy
        try:
            init(self, model, *args, **kwargs)
        finally:
            del model.compute_logits

    monkeypatch.setattr(ModelRunner, "__init__", spying_init)
    eng = _engine(model_dir)
    buckets = eng.runner.graphs.batch_sizes
    assert buckets == [1, 2, 4, 8, 16, 24, 32]
    assert sorted(set(rows)) == sorted({n for b in buckets for n in (b - 1, b) if n > 0})
