"""Deltas reach asyncio consumers of a real engine batched: one cross-thread wakeup of the event loop per engine
step however many requests stream in it, and one per request for `agenerate`, which waits only for the end. The
outputs are those of the thread API, and a cancelled `agenerate` still frees its request within one step."""
from __future__ import annotations

import asyncio

import pytest

from braidinfer import SamplingParams
from tests.support.engines import StepProbe, idle_problems

PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


@pytest.fixture
def probe(llm):
    assert not idle_problems(llm)
    with StepProbe(llm) as probe:
        yield probe
    assert not idle_problems(llm)


def _prompts(llm, n):
    return [llm.apply_chat_template([{"role": "user", "content": f"Name a colour, number {i}."}]) for i in range(n)]


def _count_wakeups(loop):
    """Counts call_soon_threadsafe on `loop` from now on; returns a function reading the count."""
    count, original = [0], loop.call_soon_threadsafe

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    loop.call_soon_threadsafe = counted
    return lambda: count[0]


def test_streams_wake_the_event_loop_once_per_step(llm, probe):
    prompts = _prompts(llm, 4)
    expected = [o.token_ids for o in llm.generate(prompts, PARAMS)]
    steps_before = probe.steps

    async def consume(prompt):
        return [t async for delta in llm.astream_deltas(prompt, PARAMS) for t in delta.token_ids]

    async def main():
        wakeups = _count_wakeups(asyncio.get_running_loop())
        got = await asyncio.gather(*(consume(p) for p in prompts))
        return got, wakeups()

    got, wakeups = asyncio.run(main())
    assert got == expected
    steps = probe.steps - steps_before
    assert wakeups <= steps < sum(map(len, expected)), (wakeups, steps)


def test_agenerate_is_woken_once_per_request(llm, probe):
    prompts = _prompts(llm, 3)
    expected = llm.generate(prompts, PARAMS)

    async def main():
        wakeups = _count_wakeups(asyncio.get_running_loop())
        got = await asyncio.gather(*(llm.agenerate(p, PARAMS) for p in prompts))
        return got, wakeups()

    got, wakeups = asyncio.run(main())
    assert [(o.text, o.token_ids, o.usage) for o in got] == [(o.text, o.token_ids, o.usage) for o in expected]
    assert 1 <= wakeups <= len(prompts)


def test_cancelling_agenerate_frees_its_request(llm, probe):
    prompt = _prompts(llm, 1)[0]

    async def main():
        task = asyncio.create_task(llm.agenerate(prompt, LONG))
        while probe.steps < 3:  # it is generating
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await asyncio.to_thread(idle_problems, llm)

    assert not asyncio.run(main())
    steps = probe.steps_until_freed()
    assert len(steps) == 1 and max(steps.values()) <= 1, steps
