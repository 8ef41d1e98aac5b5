"""Faults: an exception inside one request's processing fails that request alone, with a clear error, and the
others finish as if nothing happened; one inside a step (out of memory in the forward) fails the requests of that
step, and those still waiting are served; one inside a call posted to the engine thread fails that call alone. When
the engine loop itself dies, every caller (running, queued, or still
in the engine's inbox) gets EngineDeadError instead of waiting forever; `LLM` then says to create a new one, and
ChatBraid's engine registry builds a fresh engine on the next call."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from braid_langchain import ChatBraid, engines
from braidinfer import SamplingParams
from braidinfer.channels import SyncChannel
from braidinfer.errors import EngineDeadError, InvalidRequestError, RequestFailedError
from braidinfer.client import collect as _collect
from braidinfer.sequence import Sequence
from tests.support.engines import held_between_steps, idle_problems, tiny_engine

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
DEADLINE_S = 60  # a caller left waiting fails the test after this long instead of hanging it


class Fatal(BaseException):
    """Not an Exception: what kills the engine loop itself (the step's own error handling does not catch it)."""


@pytest.fixture(scope="module")
def tiny(tiny_llama, async_scheduling):
    with tiny_engine(tiny_llama, async_scheduling=async_scheduling) as llm:
        yield llm


def _prompts(n):
    return [[5 + 97 * i + 13 * j for j in range(10 + i)] for i in range(n)]


def _run_all(llm, prompts, params):
    """Streams every prompt at once, all submitted before the engine's next step (so the first step's batch is
    the first requests in prompt order); each result is its text or the exception it raised."""
    async def one(prompt, p):
        return "".join([d async for d in llm.astream(prompt, p)])

    async def main():
        with held_between_steps(llm):
            inbox = _counted_inbox(llm)
            tasks = [asyncio.ensure_future(one(p, sp)) for p, sp in zip(prompts, params)]
            await asyncio.sleep(0)  # each task submits its request and waits for its first chunk
            await asyncio.sleep(0)  # the requests of that iteration go to the engine loop's inbox
            _wait_until_queued(inbox, len(prompts))
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), DEADLINE_S)

    return asyncio.run(main())


def test_a_sampler_fault_fails_only_its_request(tiny, monkeypatch):
    prompts = _prompts(4)
    expected = [o.text for o in tiny.generate(prompts, GREEDY)]
    poisoned = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, seed=666)  # same tokens, own identity
    sampler = tiny.engine.sampler

    def faulty(logits, params, generators, **kwargs):
        if any(p is poisoned for p in params):
            raise RuntimeError("injected sampler fault")
        return sampler(logits, params, generators, **kwargs)

    monkeypatch.setattr(tiny.engine, "sampler", faulty)
    results = _run_all(tiny, prompts, [GREEDY, poisoned, GREEDY, GREEDY])
    assert isinstance(results[1], RequestFailedError) and "injected sampler fault" in str(results[1])
    assert [r for i, r in enumerate(results) if i != 1] == [e for i, e in enumerate(expected) if i != 1]
    assert not idle_problems(tiny)


def test_a_detokenizer_fault_at_the_last_token_fails_only_its_request(tiny, monkeypatch):
    prompts = _prompts(3)
    expected = [o.text for o in tiny.generate(prompts, GREEDY)]
    make = tiny.engine.requests.sequence

    def make_with_fault(prompt, params=None, **kw):
        seq = make(prompt, params, **kw)
        if prompt == prompts[2]:
            def broken():
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenizer fault")
            seq.detokenizer.flush = broken  # runs only when the request finishes
        return seq

    monkeypatch.setattr(tiny.engine.requests, "sequence", make_with_fault)
    results = _run_all(tiny, prompts, [GREEDY] * 3)
    assert isinstance(results[2], RequestFailedError) and "injected detokenizer fault" in str(results[2])
    assert results[:2] == expected[:2]
    assert not idle_problems(tiny)


def test_a_tokenizer_fault_is_a_clear_error_for_that_request(tiny, monkeypatch):
    tokenizer = tiny.tokenizer

    class Faulty:
        """The real tokenizer, except that it breaks on one text."""

        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, text, *args, **kwargs):
            if "POISON" in text:
                raise RuntimeError("injected tokenizer fault")
            return tokenizer(text, *args, **kwargs)

    monkeypatch.setattr(tiny.engine.requests, "tokenizer", Faulty())  # what requests are encoded with
    monkeypatch.setattr(tiny, "tokenizer", Faulty())
    with pytest.raises(InvalidRequestError, match="tokenizer cannot encode.*injected tokenizer fault"):
        tiny.generate("POISON pill", GREEDY)
    with pytest.raises(InvalidRequestError, match="tokenizer cannot encode.*injected tokenizer fault"):
        tiny.chat([{"role": "user", "content": "POISON pill"}], GREEDY)
    assert tiny.generate("a healthy prompt", GREEDY)[0].usage.completion_tokens == 12
    assert tiny.chat([{"role": "user", "content": "healthy"}], GREEDY).usage.completion_tokens == 12


def test_when_the_loop_dies_every_caller_gets_an_error(tiny_llama):
    """The step blocks, callers queue up behind it (some still in the inbox), then the loop dies."""
    llm = tiny_engine(tiny_llama)
    entered, release = threading.Event(), threading.Event()

    def dying_step():
        entered.set()
        release.wait(DEADLINE_S)
        raise Fatal("injected loop fault")

    llm.engine.step = dying_step
    errors: dict[str, BaseException | None] = {}

    def caller(name, fn) -> threading.Thread:
        def run():
            try:
                fn()
                errors[name] = None
            except BaseException as e:
                errors[name] = e

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    async def streams():
        return await asyncio.gather(*(_drain(llm.astream(p, GREEDY)) for p in _prompts(2)), return_exceptions=True)

    first = caller("running", lambda: llm.generate(_prompts(1), GREEDY))
    assert entered.wait(DEADLINE_S)
    inbox = _counted_inbox(llm)
    # These reach the engine's inbox while the step runs: the engine never sees them before it dies.
    queued = [caller(f"queued-{i}", lambda: llm.generate(_prompts(2), GREEDY)) for i in range(2)]
    queued.append(caller("async", lambda: _raise_first(asyncio.run(streams()))))
    _wait_until_queued(inbox, 2 * 2 + 2)
    release.set()
    for t in [first, *queued]:
        t.join(DEADLINE_S)
    assert not any(t.is_alive() for t in [first, *queued]), f"callers still waiting: {errors}"
    assert all(isinstance(e, EngineDeadError) and "injected loop fault" in str(e) for e in errors.values()), errors
    assert not llm.alive
    with pytest.raises(EngineDeadError, match="create a new LLM"):
        llm.generate("anything", GREEDY)
    llm.close()  # closing a dead LLM is fine
    with pytest.raises(EngineDeadError, match="create a new LLM"):
        llm.cache_stats()


def test_a_closed_llm_says_to_create_a_new_one(tiny_llama):
    llm = tiny_engine(tiny_llama)
    llm.close()
    assert not llm.alive
    with pytest.raises(EngineDeadError, match="closed.*create a new LLM"):
        llm.generate("anything", GREEDY)


def test_chat_braid_replaces_a_dead_or_closed_engine(tiny_llama):
    key = (tiny_llama, "cpu", "float32")
    chat = ChatBraid(model=tiny_llama, device="cpu", dtype="float32", temperature=0.0, max_tokens=6)
    try:
        expected = chat.invoke("Hello there").content
        first = engines.get_engine(*key)
        first._loop.post(_die)  # anything that breaks the loop itself
        with pytest.raises(EngineDeadError):
            first.generate("x", GREEDY)
        assert not engines.is_loaded(*key)  # so the async path loads the next one off the event loop
        assert chat.invoke("Hello there").content == expected
        second = engines.get_engine(*key)
        assert second is not first and second.alive
        second.close()  # closed by someone else
        assert asyncio.run(chat.ainvoke("Hello there")).content == expected
        assert engines.get_engine(*key) not in (first, second)
    finally:
        engines.close_engine(*key)


def _die():
    raise Fatal("injected loop fault")


async def _drain(deltas):
    return "".join([d async for d in deltas])


def _raise_first(results):
    for r in results:
        if isinstance(r, BaseException):
            raise r


def _within_deadline(fn):
    """fn() run in a thread of its own: its result, or the exception it raised; fails the test if it still waits
    after DEADLINE_S (a caller left hanging)."""
    box = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as e:  # handed back below
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(DEADLINE_S)
    assert not thread.is_alive(), f"still waiting after {DEADLINE_S} s"
    if "error" in box:
        raise box["error"]
    return box["result"]


class _CountedInbox:
    """The engine loop's inbox, counting the requests put in it (a SimpleQueue cannot be looked into); the engine
    thread, held or inside a step, takes none of them meanwhile."""

    def __init__(self, inbox):
        self._inbox, self.requests = inbox, 0

    def put(self, item):
        self.requests += len(item) if isinstance(item, list) else isinstance(item, Sequence)
        self._inbox.put(item)

    def __getattr__(self, name):
        return getattr(self._inbox, name)


def _counted_inbox(llm) -> _CountedInbox:
    """Counts the requests submitted to `llm` from now on (the same queue underneath)."""
    llm._loop._inbox = _CountedInbox(llm._loop._inbox)
    return llm._loop._inbox


def _wait_until_queued(inbox: _CountedInbox, n):
    """Waits until `n` requests sit in the engine loop's inbox (the submissions of the queued callers; those of one
    event-loop iteration arrive as one list)."""
    for _ in range(DEADLINE_S * 100):
        if inbox.requests >= n:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"only {inbox.requests} of {n} requests reached the inbox")


def test_an_out_of_memory_error_in_the_forward_fails_that_step_and_the_engine_keeps_serving(tiny, monkeypatch):
    """What CUDA raises when the device runs out of memory (torch.OutOfMemoryError), injected into one forward: the
    requests of the step end with a clear error naming it, their pages come back, and the next requests are served
    exactly as before."""
    prompts = _prompts(3)
    expected = [o.text for o in tiny.generate(prompts, GREEDY)]
    run, calls = tiny.engine.runner.run, []

    def oom_once(batch, *pending):
        calls.append(len(batch))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return run(batch, *pending)

    monkeypatch.setattr(tiny.engine.runner, "run", oom_once)
    results = _run_all(tiny, prompts, [GREEDY] * 3)
    failed = [r for r in results if isinstance(r, RequestFailedError)]
    assert failed and all("OutOfMemoryError" in str(r) for r in failed)
    assert all(r == e for r, e in zip(results, expected) if not isinstance(r, BaseException))
    assert not idle_problems(tiny)
    assert [o.text for o in tiny.generate(prompts, GREEDY)] == expected


def test_a_failing_step_fails_only_the_requests_it_ran(tiny_llama, async_scheduling, monkeypatch):
    """Four requests arrive together and the engine runs two at a time: an out-of-memory error in the first step
    fails its two requests, and the two still waiting are then served exactly as before."""
    with tiny_engine(tiny_llama, async_scheduling=async_scheduling, max_num_seqs=2) as llm:
        prompts = _prompts(4)
        expected = [o.text for o in llm.generate(prompts, GREEDY)]
        run, ran = llm.engine.runner.run, []

        def oom_first(batch, *pending):
            if not ran:
                ran.append([seq.request_id for seq in batch.seqs])
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return run(batch, *pending)

        monkeypatch.setattr(llm.engine.runner, "run", oom_first)
        results = _run_all(llm, prompts, [GREEDY] * 4)
        assert len(ran[0]) == 2
        assert all(isinstance(r, RequestFailedError) and "OutOfMemoryError" in str(r) for r in results[:2]), results
        assert results[2:] == expected[2:]
        assert not idle_problems(llm)


def test_a_failing_posted_call_fails_alone(tiny_llama):
    """A call posted to the engine thread that raises (a bookkeeping bug: unpinning a page nobody pinned) is
    logged and handed to its poster; the loop goes on serving."""
    with tiny_engine(tiny_llama) as llm:
        expected = [o.text for o in llm.generate(_prompts(2), GREEDY)]
        llm._loop.post(lambda: llm.engine.pages.unpin([0]))  # posted, nobody waits for it
        assert [o.text for o in llm.generate(_prompts(2), GREEDY)] == expected
        with pytest.raises(AssertionError, match="unpinned more often than pinned"):
            llm._loop.post(lambda: llm.engine.pages.unpin([0])).result(DEADLINE_S)
        with pytest.raises(ZeroDivisionError):
            llm._loop.call(lambda: 1 / 0)
        assert llm.alive and not idle_problems(llm)


def test_a_request_the_engine_refuses_fails_alone(tiny_llama):
    """Two requests under one id reach the engine together: the second is refused with a clear error, the first
    is served, the loop goes on."""
    with tiny_engine(tiny_llama) as llm:
        expected = llm.generate(_prompts(1), GREEDY)[0].text
        channels = [SyncChannel(), SyncChannel()]
        with held_between_steps(llm):
            streams = [llm._client.start(llm.engine.requests.sequence(p, GREEDY, sink=c.put, request_id="twin"), c)
                       for p, c in zip(_prompts(2), channels)]
        with pytest.raises(InvalidRequestError, match="'twin' is already running"):
            _within_deadline(lambda: _collect(streams[1]))
        assert _within_deadline(lambda: _collect(streams[0])).text == expected
        assert llm.alive and not idle_problems(llm)
