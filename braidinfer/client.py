"""The client side of the engine loop: submits requests from any thread or event loop and collects what they stream;
runs chunk prefills and drops pins. `LLM` and `ChunkStore` both use it; the engine sees only sequences and plain
values (token ids, pin owners), never the handles callers hold."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Self

from braidinfer.channels import AsyncChannel, SyncChannel
from braidinfer.engine import LLMEngine
from braidinfer.engine_loop import EngineLoop
from braidinfer.errors import EngineDeadError
from braidinfer.outputs import CompletionDelta, RequestOutput
from braidinfer.sequence import Sequence


class EngineClient:
    def __init__(self, engine: LLMEngine, loop: EngineLoop):
        self.engine, self.loop = engine, loop

    def start(self, seq: Sequence, channel: SyncChannel | AsyncChannel) -> Stream:
        """Submits a sequence built with `channel.put` as its sink; returns its stream. One for an event loop (an
        AsyncChannel) reaches the engine with the others submitted in the same iteration of that loop."""
        stream = Stream(self.loop, seq.request_id, seq.token_ids[:], channel)
        if isinstance(channel, AsyncChannel):
            self.loop.submit_soon(seq)
        else:
            self.loop.submit(seq)
        return stream

    def async_channel(self, final_only: bool = False) -> AsyncChannel:
        """A channel to the running event loop (call it from a coroutine); `final_only`: see `AsyncChannel`."""
        return AsyncChannel(asyncio.get_running_loop(), self.loop.outbox, final_only)

    def prefill_and_pin(self, token_ids: list[int], owner: str, private: bool = False) -> list[int]:
        """Runs a chunk's prefill, pins its pages for `owner` and returns them. Nothing stays pinned when the
        prefill fails or the caller gives up."""
        channel = SyncChannel(final_only=True)
        seq = self.engine.requests.prefill(token_ids, owner, sink=channel.put, private=private)
        stream = self.start(seq, channel)
        try:
            collect(stream)
        except BaseException:
            self._abandon_prefill(stream, owner)
            raise
        return seq.pinned_pages

    async def aprefill_and_pin(self, token_ids: list[int], owner: str, private: bool = False) -> list[int]:
        """`prefill_and_pin` for asyncio: waits without blocking the event loop."""
        channel = self.async_channel(final_only=True)
        seq = self.engine.requests.prefill(token_ids, owner, sink=channel.put, private=private)
        stream = self.start(seq, channel)
        try:
            await acollect(stream)
        except BaseException:
            self._abandon_prefill(stream, owner)
            raise
        return seq.pinned_pages

    def unpin(self, owner: str) -> None:
        """Drops `owner`'s pin, between engine steps (returns at once; a no-op once the engine is gone)."""
        try:
            self.loop.post(lambda: self.engine.unpin(owner))
        except EngineDeadError:  # the engine is gone, and its page pool with it
            pass

    def _abandon_prefill(self, stream: Stream, owner: str) -> None:
        # The caller gave up (error, cancellation): nothing may stay pinned without a handle. The abort and the
        # unpin run in the engine thread in this order, after any pin the prefill made.
        stream.cancel()
        self.unpin(owner)


class Stream:
    """One submitted request as its caller sees it: the channel its deltas arrive on."""

    def __init__(self, loop: EngineLoop, request_id: str, prompt_token_ids: list[int], channel):
        self.loop, self.request_id, self.channel = loop, request_id, channel
        self.prompt_token_ids = prompt_token_ids
        self.done = False

    def accept(self, delta: CompletionDelta) -> CompletionDelta:
        """Takes the next delta off the channel: raises if the request failed, marks the stream done at its end."""
        if delta.error is not None:
            self.done = True
            raise delta.error
        self.done = delta.finish_reason is not None
        return delta

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            self.loop.abort(self.request_id)


class AsyncRequest:
    """What astream / astream_deltas return: an async iterator over one request, which `start` submits on the
    first step.

    Not an async generator: dropping one of those only schedules its aclose() on the event loop (asyncio's
    finalizer hook), so a consumer that breaks out of `async for` and then runs on without yielding to the loop
    would keep the request generating and its pages held. This one ends the request as it is dropped."""

    def __init__(self, start: Callable[[], Stream], texts: bool):
        self._start, self._texts = start, texts  # texts: yield the non-empty text deltas instead of the deltas
        self._stream: Stream | None = None
        self._closed = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> str | CompletionDelta:
        if self._closed:
            raise StopAsyncIteration
        if self._stream is None:
            self._stream = self._start()
        stream = self._stream
        try:
            while not stream.done:
                delta = stream.accept(await stream.channel.get())
                if not self._texts:
                    return delta
                if delta.text:
                    return delta.text
        except BaseException:  # the task was cancelled (a failed request has ended already)
            stream.cancel()
            raise
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Ends the request now (a no-op once it has ended); the iterator then stops."""
        self._close()

    def __del__(self) -> None:
        self._close()

    def _close(self) -> None:
        self._closed = True
        if self._stream is not None:
            self._stream.cancel()


class _Accumulator:
    def __init__(self):
        self.text, self.token_ids, self.logprobs, self.last = [], [], [], None

    def add_all(self, stream: Stream, deltas: list[CompletionDelta]) -> None:
        for delta in deltas:
            stream.accept(delta)  # raises the request's error
            self.text.append(delta.text)
            self.token_ids.extend(delta.token_ids)
            self.logprobs.extend(delta.logprobs)
            self.last = delta

    def output(self, prompt_token_ids: list[int]) -> RequestOutput:
        last = self.last
        return RequestOutput(last.request_id, prompt_token_ids, "".join(self.text), self.token_ids,
                             last.finish_reason, last.usage, self.logprobs)


def collect(stream: Stream, deadline: float | None = None) -> RequestOutput:
    """Waits for a request to finish and returns its output (raises its error). `deadline` (time.monotonic()):
    past it, raises queue.Empty (the caller aborts the request)."""
    acc = _Accumulator()
    while not stream.done:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        acc.add_all(stream, stream.channel.get_many(wait))
    return acc.output(stream.prompt_token_ids)


async def acollect(stream: Stream) -> RequestOutput:
    """`collect` for asyncio."""
    acc = _Accumulator()
    while not stream.done:
        acc.add_all(stream, await stream.channel.get_many())
    return acc.output(stream.prompt_token_ids)
