"""Giving up on a request mid-generation (breaking out of a stream, cancelling its task, a client that disconnects)
frees its KV pages within one engine step, and the engine returns to idle. Requests running beside the cancelled
ones still get the answers they get alone."""
from __future__ import annotations

import asyncio
import threading
from contextlib import aclosing

import pytest

from braid_langchain import ChatBraid
from braidinfer import SamplingParams
from tests.support.engines import StepProbe, idle_problems, wait_until_idle

LONG = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)  # far longer than any test waits for


@pytest.fixture
def probe(llm):
    assert not idle_problems(llm)
    with StepProbe(llm) as probe:
        yield probe
    assert not idle_problems(llm)


def _prompt(llm, text):
    return llm.apply_chat_template([{"role": "user", "content": text}])


def _freed_within_one_step(probe, expected):
    steps = probe.steps_until_freed()
    assert len(steps) == expected, f"expected {expected} aborted requests, saw {steps}"
    assert max(steps.values()) <= 1, f"pages came back only after {steps} steps"


def test_breaking_out_of_a_stream(llm, probe):
    for i, _ in enumerate(llm.stream(_prompt(llm, "Count slowly to fifty."), LONG)):
        if i == 2:
            break
    assert not idle_problems(llm)  # cache_stats and friends run in the engine thread after the abort
    _freed_within_one_step(probe, 1)


def test_closing_an_async_stream(llm, probe):
    async def main():
        async with aclosing(llm.astream(_prompt(llm, "Count slowly to fifty."), LONG)) as deltas:
            async for i, _ in _enumerate(deltas):
                if i == 2:
                    break
        return await asyncio.to_thread(idle_problems, llm)

    assert not asyncio.run(main())  # idle as soon as the stream is closed, not when it is garbage-collected
    _freed_within_one_step(probe, 1)


def test_breaking_out_of_an_async_stream_frees_it_at_once(llm, probe):
    """A plain `break`, no aclosing: the request ends as the dropped iterator goes, without the event loop turning
    again (here it does not: the coroutine goes on with blocking calls), as a sync generator's does."""
    async def main():
        count = 0
        async for _ in llm.astream(_prompt(llm, "Count slowly to fifty."), LONG):
            count += 1
            if count == 3:
                break
        return wait_until_idle(llm)  # blocks the event loop

    assert not asyncio.run(main())
    _freed_within_one_step(probe, 1)


def test_an_async_stream_left_behind_by_a_closed_event_loop_is_freed_when_dropped(llm, probe):
    """Its event loop closed without closing its async generators (no asyncio.run): nothing can run the stream's
    cleanup on that loop any more; dropping the stream still ends the request."""
    async def first(deltas):
        return await anext(deltas)  # called in the loop: an async generator would now belong to it

    loop = asyncio.new_event_loop()
    deltas = llm.astream(_prompt(llm, "Count slowly to fifty."), LONG)
    try:
        loop.run_until_complete(first(deltas))
    finally:
        loop.close()
    del deltas
    assert not wait_until_idle(llm)
    _freed_within_one_step(probe, 1)


def test_cancelling_the_task(llm, probe):
    async def main():
        started = asyncio.Event()

        async def consume():
            async for _ in llm.astream_deltas(_prompt(llm, "Count slowly to fifty."), LONG):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await asyncio.to_thread(idle_problems, llm)

    assert not asyncio.run(main())
    _freed_within_one_step(probe, 1)


def test_client_disconnect_in_a_streaming_response(llm, probe):
    """A web server streams ChatBraid's reply; the client goes away after three pieces and the server cancels the
    response task (what Starlette does on `http.disconnect`)."""
    chat = ChatBraid(device="cpu", temperature=0.0, max_tokens=200)

    async def body():
        async for chunk in chat.astream("Count slowly to fifty."):
            yield chunk.content

    async def main():
        received, disconnected = [], asyncio.Event()

        async def send(piece):
            received.append(piece)
            if len(received) == 3:
                disconnected.set()

        async def respond():
            async for piece in body():
                await send(piece)

        response = asyncio.create_task(respond())
        await disconnected.wait()
        response.cancel()
        await asyncio.gather(response, return_exceptions=True)
        return await asyncio.to_thread(idle_problems, llm)

    assert not asyncio.run(main())
    _freed_within_one_step(probe, 1)


def test_cancelling_some_of_many_streams_leaves_the_others_exact(llm, probe):
    """Twelve requests at once; eight of them are given up in different ways and at different points (one before
    its first token), the other four must still get their answers alone."""
    params = SamplingParams(temperature=0, max_tokens=10)
    prompts = [_prompt(llm, f"Name {n} things that are {colour}.")
               for n, colour in zip(range(2, 14), ["red", "blue", "green", "small", "loud", "old", "cold", "soft",
                                                   "round", "sweet", "fast", "bright"])]
    kept = (0, 5, 7, 10)
    alone = {i: llm.generate([prompts[i]], params)[0].text for i in kept}

    def sync_break(prompt, after):
        for i, _ in enumerate(llm.stream(prompt, LONG)):
            if i == after:
                break

    async def task_cancelled(prompt, after):
        seen = asyncio.Event()
        count = 0

        async def consume():
            nonlocal count
            async for _ in llm.astream_deltas(prompt, LONG):
                count += 1
                if count > after:
                    seen.set()

        task = asyncio.create_task(consume())
        if after >= 0:
            await seen.wait()
        else:
            await asyncio.sleep(0)  # submitted, probably still waiting for its first step
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def closed(prompt, after):
        async with aclosing(llm.astream_deltas(prompt, LONG)) as chunks:
            async for i, _ in _enumerate(chunks):
                if i == after:
                    break

    async def main():
        given_up = [task_cancelled(prompts[1], -1), task_cancelled(prompts[2], 0), closed(prompts[3], 1),
                    task_cancelled(prompts[4], 4), closed(prompts[6], 6), task_cancelled(prompts[9], 2)]
        threads = [threading.Thread(target=sync_break, args=(prompts[i], after), daemon=True)
                   for i, after in ((8, 2), (11, 5))]
        for t in threads:
            t.start()
        results = await asyncio.wait_for(asyncio.gather(
            *(llm.agenerate(prompts[i], params) for i in kept), *given_up), 120)
        for t in threads:
            await asyncio.to_thread(t.join, 120)
        assert not any(t.is_alive() for t in threads)
        return [r.text for r in results[: len(kept)]]

    assert dict(zip(kept, asyncio.run(main()))) == alone
    assert not idle_problems(llm)
    steps = probe.steps_until_freed()
    assert len(steps) >= 6 and max(steps.values()) <= 1, steps  # a request cancelled early may never have run


async def _enumerate(aiterable):
    i = 0
    async for item in aiterable:
        yield i, item
        i += 1
