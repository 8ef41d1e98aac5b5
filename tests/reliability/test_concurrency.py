"""Many callers at once on one shared engine: 32 async streams and 8 threads calling `invoke`, all through
ChatBraid's engine registry. Every greedy answer must equal the answer the same request gets alone, nobody may
wait forever, and generation must never block the event loop the streams run on."""
from __future__ import annotations

import asyncio
import statistics
import threading
import time

import pytest

from braid_langchain import ChatBraid
from tests.support.engines import StepProbe, idle_problems

NUM_STREAMS, NUM_THREADS = 32, 8
DEADLINE_S = 120  # a deadlock fails the test after this long instead of hanging it
SUBJECTS = ["rivers", "owls", "copper", "tea", "glaciers", "chess", "bees", "volcanoes", "maps", "violins",
            "salt", "comets", "bridges", "moss", "tides", "paper", "wolves", "clocks", "deserts", "coral"]
# 20 distinct questions for 40 callers: asking each alone is what costs time here, and identical requests running
# side by side (a common load: one prompt, many users) exercise the prefix cache's deduplication of shared pages.
QUESTIONS = [f"Tell me one fact about {subject}." for subject in SUBJECTS]
CALLS = (QUESTIONS + QUESTIONS)[:NUM_STREAMS + NUM_THREADS]


@pytest.fixture(scope="module")
def chat(embedded_llm):
    return ChatBraid(device="cpu", temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def answers_alone(chat):
    """Each question asked with nothing else running, one step at a time (set up before `llm` switches the mode):
    the reference every concurrent answer must equal, in either mode."""
    return {q: chat.invoke(q).content for q in QUESTIONS}


def test_streams_and_threads_get_their_answers_alone(llm, chat, answers_alone):
    got: list[str | BaseException | None] = [None] * len(CALLS)
    gaps: list[float] = []  # how late each wake-up of a coroutine sleeping in a loop was

    def invoke(i):
        try:
            got[i] = chat.invoke(CALLS[i]).content
        except BaseException as e:  # reported below, never lost in a thread
            got[i] = e

    async def stream(i):
        got[i] = "".join([chunk.content async for chunk in chat.astream(CALLS[i])])

    async def main():
        ticks = asyncio.create_task(_ticker(gaps))
        threads = [threading.Thread(target=invoke, args=(i,), daemon=True) for i in range(NUM_STREAMS, len(CALLS))]
        for t in threads:
            t.start()
        await asyncio.wait_for(asyncio.gather(*(stream(i) for i in range(NUM_STREAMS))), DEADLINE_S)
        for t in threads:
            await asyncio.to_thread(t.join, DEADLINE_S)
        ticks.cancel()
        await asyncio.gather(ticks, return_exceptions=True)
        return [t for t in threads if t.is_alive()]

    with StepProbe(llm) as probe:
        start = time.perf_counter()
        hung = asyncio.run(main())
        wall = time.perf_counter() - start
    assert not hung, f"{len(hung)} invoke threads still waiting after {DEADLINE_S} s"
    wrong = {i: (got[i], answers_alone[q]) for i, q in enumerate(CALLS) if got[i] != answers_alone[q]}
    assert not wrong, f"answers differ from the same request alone: {wrong}"
    assert not idle_problems(llm)
    step_s = statistics.median(probe.step_seconds)
    print(f"\n{len(CALLS)} concurrent requests in {wall:.1f} s over {probe.steps} engine steps (median "
          f"{step_s * 1000:.0f} ms); longest event-loop gap {max(gaps) * 1000:.0f} ms")
    # A loop that waited for generation would stall for a whole step at least; preparing 32 requests at once
    # (templates, tokenization) costs it a few milliseconds each.
    assert max(gaps) < step_s / 2, f"the event loop stalled for {max(gaps):.2f} s while streams ran"


_TICK_S = 0.005


async def _ticker(gaps: list[float]):
    """Sleeps a few milliseconds over and over, recording how late each wake-up was."""
    last = time.perf_counter()
    while True:
        await asyncio.sleep(_TICK_S)
        now = time.perf_counter()
        gaps.append(now - last - _TICK_S)
        last = now
