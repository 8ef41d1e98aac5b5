"""How a request's deltas travel from the engine thread to their consumer: a per-request channel.

`SyncChannel` is a `queue.Queue` for a consumer thread. `AsyncChannel` serves a coroutine: its deltas wait in the
engine loop's `Outbox` until the engine step that made them is over, and then every delta of that step bound for
one event loop is handed over by a single `call_soon_threadsafe`. A wakeup per delta would wake the event loop once
per request per step; with a short GPU step and many requests those cross-thread wakeups, and the GIL hand-offs
they cause, were a large part of ChatBraid's host time per call (benchmarks/langchain_overhead.py).

A consumer that wants only the finished output (`final_only`) is not woken at all until its request ends: its
channel keeps the deltas on the engine side and hands them over, all at once, with the last one.

Threads: `put`, `Outbox.add` and `Outbox.flush` run in the engine thread (a sink is called there); `get` and the
delivery run in the consumer's event loop. The engine loop flushes after every step and every batch of inbox
items, so a delta never waits longer than the step that produced it.
"""
from __future__ import annotations

import asyncio
import queue
from collections import deque

from braidinfer.outputs import CompletionDelta


class SyncChannel:
    def __init__(self):
        self._queue: queue.Queue[CompletionDelta] = queue.Queue()

    def put(self, chunk: CompletionDelta) -> None:
        self._queue.put(chunk)

    def get(self, timeout: float | None = None) -> CompletionDelta:
        """The next delta; raises queue.Empty when none arrives within `timeout` seconds (None: waits)."""
        return self._queue.get(timeout=timeout)


class Outbox:
    """Deltas bound for event loops, held until `flush` sends them: one `call_soon_threadsafe` per event loop."""

    def __init__(self):
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[AsyncChannel, list[CompletionDelta]]]] = {}

    def add(self, channel: AsyncChannel, deltas: list[CompletionDelta]) -> None:
        """Queues `deltas` (in order) for `channel` until the next flush."""
        batch = self._pending.get(channel.loop)
        if batch is None:
            batch = self._pending[channel.loop] = []
        batch.append((channel, deltas))

    def flush(self) -> None:
        """Hands every queued delta to its event loop, in the order they were added."""
        if not self._pending:
            return
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
        self._held: list[CompletionDelta] | None = [] if final_only else None  # engine thread only
        self._ready: deque[CompletionDelta] = deque()  # event loop only
        self._waiter: asyncio.Future | None = None

    def put(self, chunk: CompletionDelta) -> None:
        """Engine thread: queues a delta for the consumer (sent when the engine loop flushes its outbox)."""
        if self._held is None:
            self._outbox.add(self, [chunk])
        elif chunk.finish_reason is None and chunk.error is None:
            self._held.append(chunk)
        else:
            self._held.append(chunk)
            held, self._held = self._held, []
            self._outbox.add(self, held)

    def deliver(self, deltas: list[CompletionDelta]) -> None:
        """Event loop: makes `deltas` available to `get` and wakes the consumer."""
        self._ready.extend(deltas)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> CompletionDelta:
        """The next delta, waiting for it without blocking the event loop."""
        while not self._ready:
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._ready.popleft()
