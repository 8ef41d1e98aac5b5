"""What the reliability tests observe in an engine (whether it is idle, how many steps ran between a cancellation
and the moment its pages came back), how they line requests up for one step, and how they build an engine of their
own."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Self


def idle_problems(llm, pinned: int | None = None) -> list[str]:
    """Everything that says `llm` still holds work or pages (empty when idle). Pages held by pinned chunks are
    expected; pass `pinned` to require an exact count of them."""
    def inspect():
        engine = llm.engine
        return (engine.pages.stats(), len(engine.running), len(engine.scheduler.waiting),
                len(engine.scheduler.running), list(engine.pages.ref_counts), list(engine.pages.pin_counts))

    stats, num_requests, num_waiting, num_running, refs, pins = llm._loop.call(inspect)
    problems = []
    if stats["in_use"]:
        problems.append(f"{stats['in_use']} pages in use")
    held = [p for p, (r, n) in enumerate(zip(refs, pins)) if r != n]
    if held:
        problems.append(f"pages {held[:10]} referenced by something other than pins")
    if num_requests or num_waiting or num_running:
        problems.append(f"{num_requests} requests, {num_waiting} waiting, {num_running} running")
    if pinned is not None and stats["pinned"] != pinned:
        problems.append(f"{stats['pinned']} pinned pages, expected {pinned}")
    return problems


class StepProbe:
    """Counts and times engine steps, and for every cancelled request how many steps had run when the caller posted
    its abort and when the engine thread carried it out (so "freed within one step" is exact, whatever the timing).

    Installed on the engine and its loop instances (both look `step` / `abort` up on each call); `remove()` restores
    them."""

    def __init__(self, llm):
        self.engine, self.loop = llm.engine, llm._loop
        self.steps = 0
        self.step_seconds: list[float] = []
        self.posted: dict[str, int] = {}  # request id -> steps run when its abort was posted
        self.freed: dict[str, int] = {}  # request id -> steps run when the engine thread aborted it (still live)
        self._lock = threading.Lock()
        step, abort, post_abort = self.engine.step, self.engine.abort, self.loop.abort

        def counted_step():
            start = time.perf_counter()
            step()
            with self._lock:
                self.steps += 1
                self.step_seconds.append(time.perf_counter() - start)

        def recorded_abort(request_id):
            live = request_id in self.engine.running
            abort(request_id)
            if live:
                self.freed[request_id] = self.steps

        def recorded_post(request_id):
            post_abort(request_id)
            # Read after posting: the abort runs once the step in flight now ends, so at most one more step.
            self.posted.setdefault(request_id, self.steps)

        self.engine.step, self.engine.abort, self.loop.abort = counted_step, recorded_abort, recorded_post

    def steps_until_freed(self) -> dict[str, int]:
        """Steps between posting and carrying out each abort of a running request (posted after the cancellation
        and aborts of requests that had already finished are left out)."""
        return {rid: self.freed[rid] - self.posted[rid] for rid in self.freed if rid in self.posted}

    def remove(self) -> None:
        del self.engine.step, self.engine.abort, self.loop.abort

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@contextmanager
def held_between_steps(llm, timeout_s: float = 60) -> Iterator[None]:
    """Holds the engine thread between two steps while the block runs (for at most `timeout_s`): the requests
    submitted inside it all reach the engine before its next step, so that step's batch is known."""
    release = threading.Event()
    llm._loop.post(lambda: release.wait(timeout_s))
    try:
        yield
    finally:
        release.set()


def wait_until_idle(llm, timeout_s: float = 10) -> list[str]:
    """Polls `idle_problems` (blocking the calling thread) until the engine is idle or `timeout_s` passed; returns
    the problems left (empty when idle)."""
    deadline = time.monotonic() + timeout_s
    while (problems := idle_problems(llm)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return problems


def tiny_engine(model_dir: str, **config):
    """An LLM of its own on the tiny model (small pages, so pressure is cheap to create). Its pool holds 4,096 tokens
    unless `num_kv_pages` says otherwise: the CPU's default 1 GiB would be half a million pages of this model,
    seconds to set up."""
    from braidinfer import LLM

    config = {"num_kv_pages": 1024, **config}
    return LLM(model=model_dir, device="cpu", dtype="float32", page_size=4, max_model_len=256, progress=False,
               **config)
