"""A real CUDA out-of-memory error inside an engine step: the caching allocator refusing a 64 TiB request, raised in
the engine thread in the middle of serving. The requests of that step fail with an error that says so, the requests
outside it are served as they are alone, no KV page stays in use, and later requests get exactly the outputs they got
before the fault, through the same CUDA graphs.

Requests run together may part from their solo greedy path at a bf16 near-tie (see test_cuda_graphs); a request run
alone on a warm prefix cache repeats its earlier run exactly.
"""
from __future__ import annotations

import asyncio

import pytest
import torch

from braidinfer import LLM, SamplingParams
from braidinfer.errors import RequestFailedError
from tests.conftest import build_tiny_model
from tests.gpu.test_cuda_graphs import _assert_same_greedy
from tests.gpu.test_gpu_parity import NEEDS_FLASHINFER, SHAPES, _prompts
from tests.support.engines import held_between_steps, idle_problems

pytestmark = pytest.mark.gpu

# Three sequences at a time (graph buckets 1, 2, 3), so a fourth and fifth request wait for a place.
COMMON = {"device": "cuda", "dtype": "bfloat16", "num_kv_pages": 512, "max_num_seqs": 3, "progress": False}
DEADLINE_S = 120  # a caller still waiting after this long fails the test instead of hanging it


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=5, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm_tokenizer):
    path = tmp_path_factory.mktemp("oom-qwen3")
    build_tiny_model("qwen3", path, smollm_tokenizer, seed=11, **SHAPES["qwen3"])
    return str(path)


@pytest.fixture(scope="module", params=["torch", pytest.param("flashinfer", marks=NEEDS_FLASHINFER)])
def llm(request, model_dir):
    """An engine per attention backend; on FlashInfer, decode-only steps replay CUDA graphs (the default)."""
    with LLM(model_dir, attention_backend=request.param, **COMMON) as llm:
        assert (llm.engine.runner.graphs is not None) == (request.param == "flashinfer")
        yield llm


def _allocate_too_much() -> None:
    """Asks CUDA's caching allocator for 64 TiB: it raises torch.OutOfMemoryError, as a step that runs out does."""
    torch.empty(1 << 46, dtype=torch.uint8, device="cuda")


def _is_oom(error: BaseException) -> bool:
    return (isinstance(error, RequestFailedError) and "out of memory" in str(error)
            and isinstance(error.__cause__, torch.OutOfMemoryError))


def _solo(llm, prompts, params):
    """Each request alone, twice; the second run's outputs (their prompts' full pages then come from the prefix
    cache, as in every later run)."""
    for _ in range(2):
        outputs = [llm.generate(p, sp)[0] for p, sp in zip(prompts, params)]
    return outputs


def _run_together(llm, prompts, params):
    """Submits every request before the engine's next step (admitted in prompt order); each result is its
    RequestOutput or the exception it raised."""
    async def main():
        with held_between_steps(llm):
            tasks = [asyncio.ensure_future(llm.agenerate(p, sp)) for p, sp in zip(prompts, params)]
            await asyncio.sleep(0)  # each task submits its request and waits for its first chunk
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), DEADLINE_S)

    return asyncio.run(main())


def _assert_idle_and_unchanged(llm, prompts, params, want) -> None:
    """No page in use, and each request alone gives exactly its output from before the fault."""
    assert not idle_problems(llm) and llm.cache_stats()["in_use"] == 0
    assert [o.token_ids for o in _solo(llm, prompts, params)] == [w.token_ids for w in want]


def test_an_oom_in_a_mixed_step_fails_that_step_alone(llm, monkeypatch):
    """A (3 tokens), B, C start together; when A ends, D's prefill joins B's and C's decodes, and that step runs out
    of memory: B, C, D fail; A had finished, and E, still waiting, is served afterwards."""
    prompts = _prompts(seed=3, lengths=(40, 23, 57, 31, 19))  # none a page plus one: every prefill computes > 1 token
    params = [_greedy(n) for n in (3, 12, 12, 12, 12)]
    want = _solo(llm, prompts, params)
    run, faulted = llm.engine.runner.run, []

    def oom_in_a_mixed_step(batch, *pending):
        prefill, decode = any(n > 1 for n in batch.num_new_tokens), any(n == 1 for n in batch.num_new_tokens)
        if prefill and decode and not faulted:
            faulted.extend(prompts.index(seq.token_ids[: seq.num_prompt_tokens]) for seq in batch.seqs)
            _allocate_too_much()
        return run(batch, *pending)

    monkeypatch.setattr(llm.engine.runner, "run", oom_in_a_mixed_step)
    results = _run_together(llm, prompts, params)
    assert faulted == [1, 2, 3]
    assert all(_is_oom(results[i]) for i in faulted), results
    for i in (0, 4):
        assert len(results[i].token_ids) == len(want[i].token_ids)
        _assert_same_greedy(want[i], results[i])
    monkeypatch.undo()
    _assert_idle_and_unchanged(llm, prompts, params, want)


@pytest.mark.parametrize("moment", ["before the replay", "after the replay"])
def test_an_oom_in_a_cuda_graph_decode_step_fails_it_and_the_graphs_keep_serving(llm, monkeypatch, moment):
    """Three requests decode together through a CUDA graph; the second such step runs out of memory, either before
    anything of it ran or right after its graph replayed (its KV written, its logits never computed)."""
    graphs = llm.engine.runner.graphs
    if graphs is None:
        pytest.skip("CUDA graphs need the FlashInfer backend")
    prompts, params = _prompts(seed=4, lengths=(21, 45, 38)), [_greedy(12)] * 3
    want = _solo(llm, prompts, params)
    decode_steps = []

    if moment == "before the replay":
        run = llm.engine.runner.run

        def oom(batch, *pending):
            if len(batch) == 3 and all(n == 1 for n in batch.num_new_tokens):
                decode_steps.append(True)
                if len(decode_steps) == 2:
                    _allocate_too_much()
            return run(batch, *pending)

        monkeypatch.setattr(llm.engine.runner, "run", oom)
    else:
        replay = graphs.run

        def oom(*args, **kwargs):
            hidden = replay(*args, **kwargs)
            decode_steps.append(hidden is not None)  # whether the graph replayed
            if len(decode_steps) == 2:
                _allocate_too_much()
            return hidden

        monkeypatch.setattr(graphs, "run", oom)
    results = _run_together(llm, prompts, params)
    assert decode_steps == [True, True], "the fault was not injected into a graph step"
    assert all(_is_oom(r) for r in results), results
    monkeypatch.undo()
    _assert_idle_and_unchanged(llm, prompts, params, want)
    replays = graphs.num_replays
    together = llm.generate(prompts, params)
    assert graphs.num_replays > replays
    for w, g in zip(want, together):
        assert len(g.token_ids) == len(w.token_ids)
        _assert_same_greedy(w, g)
