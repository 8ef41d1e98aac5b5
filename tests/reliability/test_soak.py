"""Soak: 1,000 requests against the one shared engine (300 with asynchronous scheduling, nearly all of them free to
go in flight), submitted together so they batch: random prompt lengths, sampling settings and routes (async
streams, async generate, sync calls from threads), a quarter of them given up in one way or another, a few invalid.
Afterwards no page may be held, no caller may still be waiting, and no request may have failed other than by being
invalid. Run with -s to see the figures."""
from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass

from braidinfer import SamplingParams
from braidinfer.errors import InvalidRequestError
from tests.support.engines import StepProbe, idle_problems

NUM_REQUESTS = {False: 1000, True: 300}  # by async_scheduling
# With asynchronous scheduling a step is left in flight only when none of its requests needs its last token on the
# host (penalties, logprobs): in batches of up to 64, _plan's mix (5 in 6 need it) would run every step one at a
# time. The asynchronous soak keeps penalties and logprobs for this share of its requests only.
ASYNC_LAST_TOKEN_SHARE = 0.02
_OVERLAPPABLE = dict(repetition_penalty=1.0, presence_penalty=0.0, logprobs=None)
DEADLINE_S = 240  # callers still waiting after this long count as hung
WORDS = ("the river owl copper tea glacier chess bee volcano map violin salt comet bridge moss tide paper wolf clock "
         "desert coral runs over quietly seven blue under bright ancient small").split()
ROUTES = ["stream"] * 45 + ["stream-break"] * 10 + ["generate"] * 15 + ["task-cancel"] * 10 + ["thread"] * 10 + [
    "thread-break"] * 5 + ["invalid"] * 2


@dataclass
class Plan:
    route: str
    prompt: str | list[int]
    params: SamplingParams
    give_up: int | float  # chunks to read, or seconds to wait, before giving up


def _plan(llm, rng: random.Random, async_scheduling: bool) -> Plan:
    route = rng.choice(ROUTES)
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
    prompt = llm.apply_chat_template([{"role": "user", "content": text}]) if rng.random() < 0.2 else text
    if route == "invalid":
        prompt = rng.choice(["", "bad \ud800 text", [1] * 9000])
    params = SamplingParams(
        max_tokens=rng.randint(1, 12), temperature=rng.choice([0.0, 0.0, 0.0, 0.7, 1.3]),
        top_k=rng.choice([0, 5, 50]), top_p=rng.choice([1.0, 0.9]), min_p=rng.choice([0.0, 0.05]),
        seed=rng.choice([None, rng.randrange(1 << 32)]), repetition_penalty=rng.choice([1.0, 1.0, 1.2]),
        presence_penalty=rng.choice([0.0, 0.5]), logprobs=rng.choice([None, None, 0, 3]),
        stop=rng.choice([[], [], [""], [rng.choice(WORDS)]]), ignore_eos=rng.random() < 0.5)
    if async_scheduling and rng.random() >= ASYNC_LAST_TOKEN_SHARE:
        params = params.model_copy(update=_OVERLAPPABLE)
    give_up = rng.uniform(0, 2.0) if route == "task-cancel" else rng.randint(0, 8)
    return Plan(route, prompt, params, give_up)


def _check_output(out, params: SamplingParams) -> None:
    assert out.finish_reason in ("stop", "length"), out.finish_reason
    assert out.usage.completion_tokens == len(out.token_ids) <= params.max_tokens
    if params.logprobs is not None:
        assert len(out.logprobs) == len(out.token_ids)
    assert not any(s and s in out.text for s in params.stop)


async def _run(llm, plan: Plan) -> str:
    """Runs one request as planned; returns "completed", "cancelled" or "rejected" (raises on anything else)."""
    try:
        if plan.route in ("stream", "stream-break"):
            limit = plan.give_up if plan.route == "stream-break" else None
            async with contextlib.aclosing(llm.astream_deltas(plan.prompt, plan.params)) as chunks:
                async for n, chunk in _numbered(chunks):
                    if chunk.finish_reason is not None:
                        return "completed"
                    if n + 1 == limit:
                        return "cancelled"
            raise AssertionError("a stream ended without a finish reason")
        if plan.route == "generate":
            _check_output(await llm.agenerate(plan.prompt, plan.params), plan.params)
            return "completed"
        if plan.route == "task-cancel":
            task = asyncio.create_task(llm.agenerate(plan.prompt, plan.params))
            done, _ = await asyncio.wait([task], timeout=plan.give_up)
            if done:
                _check_output(task.result(), plan.params)
                return "completed"
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return "cancelled"
        if plan.route == "thread":
            _check_output((await _in_thread(llm.generate, plan.prompt, plan.params))[0], plan.params)
            return "completed"
        if plan.route == "thread-break":
            return await _in_thread(_sync_stream, llm, plan)
        await llm.agenerate(plan.prompt, plan.params)  # "invalid": must not get here
        raise AssertionError(f"an invalid request was served: {plan.prompt!r:.40}")
    except InvalidRequestError:
        if plan.route != "invalid":
            raise
        return "rejected"


def _sync_stream(llm, plan: Plan) -> str:
    for n, chunk in enumerate(llm.stream_deltas(plan.prompt, plan.params)):
        if chunk.finish_reason is not None:
            return "completed"
        if n + 1 == plan.give_up:
            return "cancelled"
    raise AssertionError("a stream ended without a finish reason")


async def _in_thread(fn, *args):
    """`fn(*args)` in a thread of its own, awaited. A daemon thread, not a pool's: every sync caller waits at once
    like the async ones (and batches with them), and one that never returns cannot hang the test at exit."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, error):
        if future.done():  # the awaiting task was cancelled at the deadline
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run():
        try:
            result, error = fn(*args), None
        except BaseException as e:
            result, error = None, e
        with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody is waiting any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, daemon=True).start()
    return await future


async def _numbered(aiterable):
    n = 0
    async for item in aiterable:
        yield n, item
        n += 1


def test_soak(llm, async_scheduling):
    num_requests = NUM_REQUESTS[async_scheduling]
    rng = random.Random(20240601)
    plans = [_plan(llm, rng, async_scheduling) for _ in range(num_requests)]
    before = llm.cache_stats()

    async def main():
        tasks = [asyncio.create_task(_run(llm, plan)) for plan in plans]
        done, pending = await asyncio.wait(tasks, timeout=DEADLINE_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return [(t.exception() or t.result()) if t in done else "hung" for t in tasks]

    with StepProbe(llm) as probe:
        start = time.perf_counter()
        outcomes = asyncio.run(main())
        wall = time.perf_counter() - start
    failures = [(plan.route, o) for plan, o in zip(plans, outcomes) if isinstance(o, BaseException)]
    tally = Counter(o for o in outcomes if isinstance(o, str))
    after = llm.cache_stats()
    problems = idle_problems(llm, pinned=before["pinned"])
    print(f"\nsoak: {num_requests} requests, {tally['completed']} completed, {tally['cancelled']} cancelled, "
          f"{tally['rejected']} rejected as invalid, {len(failures)} failed, {tally['hung']} hung; pages leaked "
          f"{after['in_use']}; wall {wall:.1f} s over {probe.steps} engine steps; "
          f"{llm.engine.scheduler.num_preemptions} preemptions in total")
    assert tally["hung"] == 0
    assert not failures, failures[:5]
    assert not problems, problems
    assert len(outcomes) == num_requests and tally["rejected"] == sum(p.route == "invalid" for p in plans)

