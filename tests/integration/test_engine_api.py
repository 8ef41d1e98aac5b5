"""The LLM API end to end on a tiny random model: streaming, async, pressure, bad input, stop conditions."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from braidinfer import LLM, SamplingParams
from braidinfer.errors import (BraidError, EngineDeadError, InvalidModelError, InvalidRequestError, ModelNotFoundError, RequestFailedError,
                               RequestTimeoutError)
from tests.support.engines import idle_problems

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir):
    return tiny_model_dir("llama", seed=7)


@pytest.fixture(scope="module")
def llm(llama_dir, async_scheduling):
    """The LLM under test, scheduling as `async_scheduling` says. 1,024 pages of 4 tokens hold every request here
    (the CPU's default 1 GiB pool takes seconds to set up)."""
    with LLM(model=llama_dir, device="cpu", dtype="float32", page_size=4, max_model_len=256, num_kv_pages=1024,
             async_scheduling=async_scheduling, progress=False) as llm:
        yield llm


def _prompts(n, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (length + i,), generator=g).tolist() for i in range(n)]


def _idle(llm):
    return not idle_problems(llm, pinned=0)


def test_stream_deltas_concatenate_to_generate_text(llm):
    prompt = "The history of the city begins"
    expected = llm.generate(prompt, GREEDY)[0]
    chunks = list(llm.stream_deltas(prompt, GREEDY))
    assert "".join(c.text for c in chunks) == expected.text
    assert [t for c in chunks for t in c.token_ids] == expected.token_ids
    assert [c.finish_reason for c in chunks].count("length") == 1 and chunks[-1].usage.completion_tokens == 16
    assert "".join(llm.stream(prompt, GREEDY)) == expected.text


def test_async_streams_match_sync_results(llm):
    prompts = _prompts(6, seed=1)
    expected = [o.text for o in llm.generate(prompts, GREEDY)]

    async def one(p):
        return "".join([d async for d in llm.astream(p, GREEDY)])

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(main()) == expected


def test_threads_share_one_engine(llm):
    prompts = _prompts(8, seed=2)
    expected = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    results = [None] * len(prompts)

    def work(i):
        results[i] = llm.generate(prompts[i], GREEDY)[0].token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == expected


def test_breaking_out_of_a_stream_frees_its_pages(llm):
    for i, _ in enumerate(llm.stream(_prompts(1, length=30, seed=3)[0], SamplingParams(max_tokens=200, ignore_eos=True))):
        if i == 3:
            break
    assert _idle(llm)


def test_stop_string_and_stop_token(llm):
    prompt = _prompts(1, seed=4)[0]
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    # Stop on the 6th generated token id: output ends with it, finish_reason is "stop".
    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_id]))[0]
    assert out.token_ids == free.token_ids[: first + 1] and out.finish_reason == "stop"
    # Stop on a piece of the text: the text ends right before its first occurrence.
    needle = free.text[10:14]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[needle]))[0]
    assert out.finish_reason == "stop" and out.text == free.text[: free.text.index(needle)]


def test_generate_past_its_timeout_aborts_every_request(llm, monkeypatch):
    step = llm.engine.step

    def slow():
        threading.Event().wait(0.05)
        step()

    monkeypatch.setattr(llm.engine, "step", slow)  # 16 tokens take 0.8 s now
    with pytest.raises(RequestTimeoutError, match="deadline"):
        llm.generate(_prompts(3, seed=5), GREEDY, timeout=0.2)
    monkeypatch.undo()
    assert _idle(llm)
    assert [len(o.token_ids) for o in llm.generate(_prompts(3, seed=5), GREEDY, timeout=60)] == [16, 16, 16]


def _prefill_steps(llm, monkeypatch) -> list[int]:
    """Counts the engine's steps that compute some prompt (a prefill) from now on."""
    schedule, count = llm.engine.scheduler.schedule, [0]

    def counted():
        batch = schedule()
        count[0] += any(n > 1 for n in batch.num_new_tokens)
        return batch

    monkeypatch.setattr(llm.engine.scheduler, "schedule", counted)
    return count


def test_async_requests_of_one_event_loop_iteration_are_admitted_together(llm, monkeypatch):
    """Coroutines that submit in one iteration of their event loop reach the engine together: as few prefill steps
    as LLM.generate, which submits the same prompts at once, and the same outputs."""
    prompts = _prompts(6, seed=8)
    steps = _prefill_steps(llm, monkeypatch)
    expected = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    together = steps[0]

    async def one(prompt):
        time.sleep(0.05)  # building a request can let the engine thread run (a tokenizer releases the GIL)
        return await llm.agenerate(prompt, GREEDY)

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    steps[0] = 0
    assert [o.token_ids for o in asyncio.run(main())] == expected
    assert steps[0] == together


def test_a_request_cancelled_before_it_reaches_the_engine_costs_nothing(llm):
    prompts = _prompts(3, seed=9)
    expected = [o.token_ids for o in llm.generate(prompts, GREEDY)]

    async def main():
        tasks = [asyncio.ensure_future(llm.agenerate(p, GREEDY)) for p in prompts]
        await asyncio.sleep(0)  # submitted, still in this event loop's batch
        tasks[1].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[1], asyncio.CancelledError)
    assert [results[0].token_ids, results[2].token_ids] == [expected[0], expected[2]]
    assert _idle(llm)


def test_a_stream_closed_by_another_task_before_its_request_reaches_the_engine_wakes_its_consumer(llm):
    """A consumer already waiting on the stream (e.g. the task writing to an HTTP client) when another task closes
    it (a disconnect handler), while the request still waits in the event loop's batch: the consumer gets the
    "abort" delta, as it does once the request runs, instead of waiting forever."""
    prompt = _prompts(1, seed=11)[0]

    async def main():
        stream = llm.astream_deltas(prompt, GREEDY)
        consumer = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # the consumer submitted; the request is still in this event loop's batch
        await stream.aclose()
        return await asyncio.wait_for(asyncio.gather(consumer, return_exceptions=True), 60)

    (delta,) = asyncio.run(main())
    assert (delta.finish_reason, delta.token_ids, delta.usage.prompt_tokens, delta.usage.completion_tokens) == (
        "abort", [], len(prompt), 0)
    assert _idle(llm)


def test_an_abort_run_by_a_garbage_collection_inside_the_loops_lock_does_not_deadlock(llm):
    """A stream dropped in a reference cycle is cancelled by the collection that frees it, which runs in whatever
    thread allocates next, maybe one that holds the engine loop's lock: the abort must not wait for that lock."""
    loop = llm._loop
    done = threading.Event()

    def collect_under_the_lock():
        with loop._lock:  # as submit_soon / _put / abort hold it while they allocate
            loop.abort("no-such-request")  # what the collected stream's finalizer calls
        done.set()

    thread = threading.Thread(target=collect_under_the_lock, daemon=True)
    thread.start()
    thread.join(60)
    assert done.is_set(), "abort waited for a lock its own thread holds"
    assert llm.generate(_prompts(1, seed=12), GREEDY)[0].finish_reason == "length"


def test_a_request_submitted_as_its_engine_closes_ends_with_an_error(llama_dir):
    closing = LLM(model=llama_dir, device="cpu", dtype="float32", page_size=4, max_model_len=256, num_kv_pages=64,
                  progress=False)

    async def main():
        task = asyncio.ensure_future(closing.agenerate(_prompts(1)[0], GREEDY))
        await asyncio.sleep(0)  # submitted, still in this event loop's batch
        closing.close()
        return await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 60)

    (result,) = asyncio.run(main())
    assert isinstance(result, EngineDeadError)


def test_more_requests_than_pages_finish_through_preemption(llama_dir, async_scheduling):
    prompts = _prompts(10, length=20, seed=5)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with LLM(model=llama_dir, device="cpu", dtype="float32", page_size=4, num_kv_pages=1024, progress=False) as roomy:
        expected = [o.token_ids for o in roomy.generate(prompts, params)]
    # 30 pages x 4 tokens hold ~2.5 of these requests at full length; 10 run at once.
    with LLM(model=llama_dir, device="cpu", dtype="float32", page_size=4, num_kv_pages=30,
             async_scheduling=async_scheduling, progress=False) as tight:
        got = [o.token_ids for o in tight.generate(prompts, params)]
        assert tight.engine.scheduler.num_preemptions > 0
        assert _idle(tight)
    assert got == expected


@pytest.mark.parametrize("bad", [
    dict(prompt="", params=None),
    dict(prompt=[], params=None),
    dict(prompt=[1, 2, 10**9], params=None),
    dict(prompt=list(range(3, 300)), params=None),  # longer than max_model_len=256
])
def test_bad_prompts_are_rejected_before_any_work(llm, bad):
    with pytest.raises(InvalidRequestError):
        llm.generate(bad["prompt"], bad["params"])
    assert llm.generate("still serving", GREEDY)[0].usage.completion_tokens == 16


def test_empty_prompt_list_and_bad_params(llm):
    with pytest.raises(InvalidRequestError, match="no prompts"):
        llm.generate([])
    with pytest.raises(InvalidRequestError, match="temperature"):
        llm.generate("x", SamplingParams(temperature=-1.0))
    with pytest.raises(InvalidRequestError, match="SamplingParams"):
        llm.generate(["a", "b"], [GREEDY])


@pytest.mark.parametrize("call", [
    lambda llm: llm.generate(5),
    lambda llm: llm.generate(None),
    lambda llm: llm.generate({"a prompt": 1}),
    lambda llm: llm.generate("x", {"max_tokens": 2}),
    lambda llm: llm.generate("x", {"max_tokens": 2, "temperature": 0}),
    lambda llm: llm.generate("x", GREEDY, timeout="1"),
    lambda llm: llm.generate("x", GREEDY, timeout=float("nan")),
    lambda llm: llm.generate("x", GREEDY, timeout=-1),
    lambda llm: list(llm.stream_deltas("x", GREEDY, timeout=True)),
    lambda llm: llm.chunks.release("chunk-0"),
    lambda llm: llm.num_cached_tokens(None),
    lambda llm: llm.num_cached_tokens([1, 2, 10**9]),
], ids=["int prompt", "None prompt", "dict prompts", "dict params", "dict of two params", "str timeout",
        "nan timeout", "negative timeout", "bool timeout", "release a string", "cached tokens of None",
        "cached tokens out of range"])
def test_bad_arguments_name_the_mistake(llm, call):
    """Each mistake raises InvalidRequestError before any work, and the engine serves on with nothing held."""
    with pytest.raises(InvalidRequestError):
        call(llm)
    assert _idle(llm)
    assert llm.generate("still serving", GREEDY)[0].usage.completion_tokens == 16


def test_a_tuple_of_ids_is_one_prompt(llm):
    ids = _prompts(1)[0]
    assert llm.generate(tuple(ids), GREEDY)[0].token_ids == llm.generate(ids, GREEDY)[0].token_ids
    assert llm.num_cached_tokens(tuple(ids)) == llm.num_cached_tokens(ids) > 0


def test_an_llm_dropped_unclosed_stops_its_thread_and_frees_its_engine(llama_dir):
    import weakref

    def engine_threads():
        return [t for t in threading.enumerate() if t.name == "braid-engine"]

    before = len(engine_threads())
    dropped = LLM(model=llama_dir, device="cpu", dtype="float32", page_size=4, max_model_len=256, num_kv_pages=64,
                  progress=False)
    dropped.generate("hello", GREEDY)
    model = weakref.ref(dropped.engine.model)
    assert len(engine_threads()) == before + 1
    del dropped  # no reference cycle holds it: shut down here, without a collection
    assert len(engine_threads()) == before
    assert model() is None


def test_request_that_can_never_fit_is_rejected(llama_dir):
    with LLM(model=llama_dir, device="cpu", dtype="float32", page_size=4, num_kv_pages=8, progress=False) as small:
        with pytest.raises(InvalidRequestError, match="page pool"):
            small.generate(list(range(3, 30)), SamplingParams(max_tokens=10))
        assert small.generate(list(range(3, 10)), SamplingParams(max_tokens=4))[0].usage.completion_tokens == 4


def test_bad_model_paths(tmp_path):
    with pytest.raises(ModelNotFoundError, match="nope"):
        LLM(model=str(tmp_path / "nope"))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(InvalidModelError):
        LLM(model=str(text))
    with pytest.raises(BraidError, match="max_num_seqs"):
        LLM(model=str(text), max_num_seqs=0)


def test_a_failing_request_does_not_take_the_others_down(llm, monkeypatch):
    prompts = _prompts(4, seed=9)
    expected = [o.text for o in llm.generate(prompts, GREEDY)]
    make = llm.engine.requests.sequence

    def make_with_fault(prompt, params=None, **kw):
        seq = make(prompt, params, **kw)
        if prompt == prompts[1]:
            def broken(token):
                raise RuntimeError("injected detokenizer fault")
            seq.detokenizer.add = broken
        return seq

    monkeypatch.setattr(llm.engine.requests, "sequence", make_with_fault)

    async def one(p):
        return "".join([d async for d in llm.astream(p, GREEDY)])

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts), return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[1], RequestFailedError) and "injected detokenizer fault" in str(results[1])
    assert [r for i, r in enumerate(results) if i != 1] == [e for i, e in enumerate(expected) if i != 1]
    assert _idle(llm)
    monkeypatch.undo()
    assert llm.generate(prompts[1], GREEDY)[0].text == expected[1]  # the fault is gone: served normally
