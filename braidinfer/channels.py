"""How a request's deltas travel from the engine thread to their consumer: a per-request channel.

`SyncChannel` serves a consumer thread through a queue. `AsyncChannel` serves a coroutine: its deltas wait in the
engine loop's `Outbox` until the engine step that made them is over, and then every delta of that step bound for
one event loop is handed over by a single `call_soon_threadsafe`. A wakeup per delta would wake the event loop once
per request per step; with a short GPU step and many requests those cross-thread wakeups, and the GIL hand-offs
they cause, were a large part of ChatBraid's host time per call (benchmarks/langchain_overhead.py).

A consumer that wants only the finished output (`final_only`, either kind) is not woken at all until its request
ends: its channel keeps the deltas on the engine side and hands them over, all at once, with the last one.
`get_many` takes every delta that has arrived at once (collecting an output needs no await per delta).

Threads: `put`, `Outbox.add` and `Outbox.flush` run in the engine thread (a sink is called there; the outbox also
takes the news of a stopped engine loop from an event loop); `get` and the delivery run in the consumer's event
loop. The engine loop flushes after every step and every batch of inbox items, so a delta never waits longer than
the step that produced it.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque

from braidinfer.outputs import CompletionDelta


class SyncChannel:
    """The deltas of one request for a consumer thread. `final_only`: the consumer is woken once, when the request
    ends, and then gets every delta at once."""

    def __init__(self, final_only: bool = False):
        self._queue: queue.SimpleQueue[list[CompletionDelta]] = queue.SimpleQueue()
        self._held = _Held() if final_only else None  # engine thread only
        self._ready: deque[CompletionDelta] = deque()  # consumer only

    def put(self, chunk: CompletionDelta) -> None:
        """Engine thread: hands a delta to the consumer (a final-only channel: all of them, with the last)."""
        deltas = [chunk] if self._held is None else self._held.add(chunk)
        if deltas:
            self._queue.put(deltas)

    def get(self, timeout: float | None = None) -> CompletionDelta:
        """The next delta; raises queue.Empty when none arrives within `timeout` seconds (None: waits)."""
        if not self._ready:
            self._ready.extend(self._queue.get(timeout=timeout))
        return self._ready.popleft()

    def get_many(self, timeout: float | None = None) -> list[CompletionDelta]:
        """Every delta that has arrived, waiting up to `timeout` seconds for one (None: waits; then queue.Empty)."""
        if not self._ready:
            self._ready.extend(self._queue.get(timeout=timeout))
        while True:
            try:
                self._ready.extend(self._queue.get_nowait())
            except queue.Empty:
                break
        deltas = list(self._ready)
        self._ready.clear()
        return deltas


class _Held:
    """A final-only channel's deltas on the engine side, until its request's last one."""

    def __init__(self):
        self._deltas: list[CompletionDelta] = []

    def add(self, chunk: CompletionDelta) -> list[CompletionDelta]:
        """Keeps `chunk`; returns every delta kept once it is the request's last (an end or an error), else []."""
        self._deltas.append(chunk)
        if chunk.finish_reason is None and chunk.error is None:
            return []
        deltas, self._deltas = self._deltas, []
        return deltas


class Outbox:
    """Deltas bound for event loops, held until `flush` sends them: one `call_soon_threadsafe` per event loop."""

    def __init__(self):
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[AsyncChannel, list[CompletionDelta]]]] = {}
        # The engine thread adds and flushes; an event loop does too when it tells requests that the engine loop
        # stopped before they reached it (EngineLoop._submit_batch), or a request was aborted before it reached it
        # (EngineLoop.abort, which a garbage collection may run inside `add`: reentrant).
        self._lock = threading.RLock()

    def add(self, channel: AsyncChannel, deltas: list[CompletionDelta]) -> None:
        """Queues `deltas` (in order) for `channel` until the next flush."""
        with self._lock:
            self._pending.setdefault(channel.loop, []).append((channel, deltas))

    def flush(self) -> None:
        """Hands every queued delta to its event loop, in the order they were added."""
        if not self._pending:
            return
        with self._lock:
            pending, self._pending = self._pending, {}
        for loop, batch in pending.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass


def _deliver(batch: list[tuple[AsyncChannel, list[CompletionDelta]]]) -> None:
    for channel, deltas in batch:
        channel.deliver(deltas)


class AsyncChannel:
    """The deltas of one request for a coroutine in `loop`. `final_only`: the consumer is woken once, when the
    request ends, and then gets every delta at once (for consumers that only collect the output)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, outbox: Outbox, final_only: bool = False):
        self.loop, self._outbox = loop, outbox
        self._held = _Held() if final_only else None  # engine thread only
        self._ready: deque[CompletionDelta] = deque()  # event loop only
        self._waiter: asyncio.Future | None = None

    def put(self, chunk: CompletionDelta) -> None:
        """Engine thread: queues a delta for the consumer (sent when the engine loop flushes its outbox)."""
        deltas = [chunk] if self._held is None else self._held.add(chunk)
        if deltas:
            self._outbox.add(self, deltas)

    def deliver(self, deltas: list[CompletionDelta]) -> None:
        """Event loop: makes `deltas` available to `get` and wakes the consumer."""
        self._ready.extend(deltas)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> CompletionDelta:
        """The next delta, waiting for it without blocking the event loop."""
        while not self._ready:
            await self._wait()
        return self._ready.popleft()

    async def get_many(self) -> list[CompletionDelta]:
        """Every delta that has arrived, waiting for one without blocking the event loop."""
        while not self._ready:
            await self._wait()
        deltas = list(self._ready)
        self._ready.clear()
        return deltas

    async def _wait(self) -> None:
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
