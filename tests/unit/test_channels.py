"""The channels and the asyncio outbox on their own (no engine): deltas arrive in order, one cross-thread wakeup
per event loop per flush, a final-only channel (thread or asyncio) is handed everything once, with its last delta,
and an error delta reaches the consumer as an exception."""
from __future__ import annotations

import asyncio
import queue
import threading
import time

import pytest

from braidinfer.channels import AsyncChannel, Outbox, SyncChannel
from braidinfer.client import Stream, acollect, collect
from braidinfer.outputs import CompletionDelta, Usage


class CountingLoop(asyncio.SelectorEventLoop):
    """An event loop that counts the cross-thread wakeups asked of it."""

    def __init__(self):
        super().__init__()
        self.wakeups = 0

    def call_soon_threadsafe(self, callback, *args, context=None):
        self.wakeups += 1
        return super().call_soon_threadsafe(callback, *args, context=context)


class FakeLoop:
    """What Stream needs of the engine loop: the aborts it is asked for."""

    def __init__(self):
        self.aborted = []

    def abort(self, request_id):
        self.aborted.append(request_id)


def _delta(request_id, i, last=False, error=None):
    usage = Usage(3, 0, i + 1) if last else None
    reason = ("error" if error else "stop") if last else None
    return CompletionDelta(request_id, f"<{request_id}:{i}>", [i], reason, usage, error=error)


def _in_thread(fn):
    """Runs fn in another thread (as the engine thread would) and waits for it."""
    thread = threading.Thread(target=fn)
    thread.start()
    thread.join()


@pytest.fixture
def loop():
    loop = CountingLoop()
    yield loop
    loop.close()


def test_deltas_arrive_in_order_across_flushes_and_channels(loop):
    outbox = Outbox()
    channels = {rid: AsyncChannel(loop, outbox) for rid in "abc"}
    sent = {rid: [_delta(rid, i, last=i == 3) for i in range(4)] for rid in "abc"}

    def engine():
        for i in range(4):  # one step: every request gets one delta, then the outbox is flushed
            for rid in "abc":
                channels[rid].put(sent[rid][i])
            outbox.flush()

    async def consume(rid):
        return [await channels[rid].get() for _ in range(4)]

    async def main():
        _in_thread(engine)
        return await asyncio.gather(*(consume(rid) for rid in "abc"))

    received = loop.run_until_complete(main())
    assert received == [sent[rid] for rid in "abc"]


def test_one_wakeup_per_event_loop_per_flush():
    first, second = CountingLoop(), CountingLoop()
    try:
        outbox = Outbox()
        channels = [AsyncChannel(first, outbox) for _ in range(5)] + [AsyncChannel(second, outbox) for _ in range(3)]
        for step in range(4):
            for i, channel in enumerate(channels):
                channel.put(_delta(str(i), step))
            outbox.flush()
        outbox.flush()  # nothing queued: no wakeup
        assert (first.wakeups, second.wakeups) == (4, 4)

        async def drain(own):
            return [[await c.get() for _ in range(4)] for c in own]

        got = first.run_until_complete(drain(channels[:5]))
        assert got == [[_delta(str(i), step) for step in range(4)] for i in range(5)]
    finally:
        first.close()
        second.close()


def test_a_final_only_channel_is_woken_once_with_every_delta(loop):
    outbox = Outbox()
    channel = AsyncChannel(loop, outbox, final_only=True)
    sent = [_delta("r", i, last=i == 5) for i in range(6)]
    for delta in sent[:-1]:
        channel.put(delta)
        outbox.flush()
    assert loop.wakeups == 0
    channel.put(sent[-1])
    outbox.flush()
    assert loop.wakeups == 1

    stream = Stream(FakeLoop(), "r", [1, 2, 3], channel)
    output = loop.run_until_complete(acollect(stream))
    assert output.text == "".join(d.text for d in sent)
    assert output.token_ids == list(range(6))
    assert (output.finish_reason, output.usage) == ("stop", sent[-1].usage)


@pytest.mark.parametrize("final_only", [False, True], ids=["streamed", "final-only"])
def test_an_error_delta_is_raised_to_the_consumer(loop, final_only):
    outbox = Outbox()
    channel = AsyncChannel(loop, outbox, final_only=final_only)
    error = RuntimeError("the step broke")
    channel.put(_delta("r", 0))
    channel.put(_delta("r", 1, last=True, error=error))
    outbox.flush()
    stream = Stream(FakeLoop(), "r", [1], channel)
    with pytest.raises(RuntimeError, match="the step broke"):
        loop.run_until_complete(acollect(stream))
    assert stream.done


def test_a_cancelled_consumer_aborts_its_request_and_later_deltas_are_harmless(loop):
    outbox = Outbox()
    channel = AsyncChannel(loop, outbox)
    engine_loop = FakeLoop()
    stream = Stream(engine_loop, "r", [1], channel)

    async def main():
        task = asyncio.create_task(acollect_cancelling(stream))
        await asyncio.sleep(0)  # the consumer now waits on the channel
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        channel.put(_delta("r", 0, last=True))  # what the abort makes the engine send
        outbox.flush()
        await asyncio.sleep(0)

    async def acollect_cancelling(stream):
        try:
            return await acollect(stream)
        except BaseException:
            stream.cancel()  # what LLM.agenerate does
            raise

    loop.run_until_complete(main())
    assert engine_loop.aborted == ["r"]


def test_deltas_for_a_closed_event_loop_are_dropped():
    closed = asyncio.new_event_loop()
    closed.close()
    outbox = Outbox()
    AsyncChannel(closed, outbox).put(_delta("r", 0))
    outbox.flush()  # no error: nobody listens on a closed loop


# --- the thread channel ------------------------------------------------------------------------------------------
def test_a_sync_channel_hands_over_each_delta_in_order():
    channel = SyncChannel()
    sent = [_delta("r", i, last=i == 4) for i in range(5)]
    _in_thread(lambda: [channel.put(d) for d in sent[:2]])
    assert channel.get(timeout=0) == sent[0]
    _in_thread(lambda: [channel.put(d) for d in sent[2:]])
    assert channel.get_many(timeout=0) == sent[1:]  # everything that has arrived, at once
    with pytest.raises(queue.Empty):
        channel.get(timeout=0)


def test_a_final_only_sync_channel_holds_every_delta_until_the_last():
    channel = SyncChannel(final_only=True)
    sent = [_delta("r", i, last=i == 5) for i in range(6)]
    _in_thread(lambda: [channel.put(d) for d in sent[:-1]])
    with pytest.raises(queue.Empty):  # nothing reaches the consumer before the request ends
        channel.get(timeout=0)
    _in_thread(lambda: channel.put(sent[-1]))
    output = collect(Stream(FakeLoop(), "r", [1, 2, 3], channel))
    assert output.text == "".join(d.text for d in sent)
    assert output.token_ids == [t for d in sent for t in d.token_ids]
    assert (output.finish_reason, output.usage) == ("stop", sent[-1].usage)


@pytest.mark.parametrize("final_only", [False, True], ids=["streamed", "final-only"])
def test_an_error_delta_is_raised_to_a_collecting_thread(final_only):
    channel = SyncChannel(final_only=final_only)
    channel.put(_delta("r", 0))
    channel.put(_delta("r", 1, last=True, error=RuntimeError("the step broke")))
    stream = Stream(FakeLoop(), "r", [1], channel)
    with pytest.raises(RuntimeError, match="the step broke"):
        collect(stream)
    assert stream.done


def test_collect_gives_up_at_its_deadline():
    channel = SyncChannel(final_only=True)
    channel.put(_delta("r", 0))  # held: the request has not ended
    start = time.monotonic()
    with pytest.raises(queue.Empty):
        collect(Stream(FakeLoop(), "r", [1], channel), deadline=start + 0.05)
    assert 0.04 <= time.monotonic() - start < 5


def test_get_many_takes_every_delta_delivered_to_an_asyncio_channel(loop):
    outbox = Outbox()
    channel = AsyncChannel(loop, outbox)
    sent = [_delta("r", i, last=i == 3) for i in range(4)]
    for delta in sent:
        channel.put(delta)
    outbox.flush()
    assert loop.run_until_complete(channel.get_many()) == sent
