"""One thread owns the engine (and so the device); callers in any thread or event loop submit to it.

Results flow back through a per-request channel (`braidinfer.channels`): a queue for threads, or for coroutines a
channel that the loop's outbox fills once per step per event loop, so an `async for` consumer needs no thread of its
own.

Requests submitted from an event loop travel the other way in batches: those submitted during one iteration of the
event loop reach the inbox together, at its end (`submit_soon`). Put one by one, the engine thread would wake for
the first of many callers that a step's results set going (each builds its request in turn), and take its next step
with it alone; the rest then join over the following steps, each of those a prefill step (on a GPU an eager step,
without a CUDA graph), where `LLM.generate` gets all of them admitted in one step.
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import torch

from braidinfer.channels import Outbox
from braidinfer.engine import LLMEngine
from braidinfer.errors import EngineDeadError
from braidinfer.outputs import CompletionDelta
from braidinfer.postprocess import OutputProcessor
from braidinfer.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Call:
    """A function posted to run in the engine thread, and the future that gets its result or its exception."""

    fn: Callable[[], Any]
    future: futures.Future

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():  # its poster cancelled it
            return
        try:
            result = self.fn()
        except Exception as e:  # fails this call alone; logged, for posters that do not wait
            log.exception("a call posted to the engine loop failed")
            self.future.set_exception(e)
        except BaseException as e:  # stops the loop: its poster hears of it too
            self.future.set_exception(e)
            raise
        else:
            self.future.set_result(result)


class EngineLoop:
    """Runs `engine.step()` in a daemon thread while there is work; sleeps on its inbox otherwise.

    The inbox holds submitted sequences and posted calls, run in order between steps. An exception of one of them
    (a call that raises, a sequence the engine refuses) fails that one alone; one of a step fails the requests the
    step ran. When the loop stops (closed, or died of a BaseException) every request and call it knows of, those
    still in the inbox included, ends with EngineDeadError: no caller waits forever.

    The loop belongs to the process that created it: a process forked from that one inherits the object but not the
    thread, so there the loop is not alive and every submission raises EngineDeadError at once."""

    def __init__(self, engine: LLMEngine, intra_op_threads: int):
        """intra_op_threads: torch's intra-op thread count the engine's thread sets for itself when it starts."""
        self.engine = engine
        self._intra_op_threads = intra_op_threads
        self._pid = os.getpid()  # the thread runs in this process only
        _guard_forked_children()
        # A SimpleQueue's put is reentrant (a garbage collection inside one may cancel a stream, which puts again);
        # queue.Queue's is not: its lock would deadlock the thread.
        self._inbox: queue.SimpleQueue[Sequence | list[Sequence] | _Call | None] = queue.SimpleQueue()
        self._batches: dict[asyncio.AbstractEventLoop, list[Sequence]] = {}  # submit_soon's, per event loop
        self._dead: BaseException | None = None  # what killed the loop
        self._closed = False
        # Reentrant: a stream dropped in a reference cycle is cancelled (`abort`) by a garbage collection, which runs
        # in whichever thread allocates next, maybe one holding this lock.
        self._lock = threading.RLock()
        self.outbox = Outbox()
        """Deltas for asyncio consumers, sent after every step and every batch of inbox items (engine thread)."""
        self._thread = threading.Thread(target=self._run, name="braid-engine", daemon=True)
        self._thread.start()
        _open_loops.add(self)  # closed at exit unless closed before (_close_open_loops)

    @property
    def alive(self) -> bool:
        return self._dead is None and not self._closed and not self._forked

    def submit(self, seq: Sequence) -> None:
        self._put(seq)

    def submit_soon(self, seq: Sequence) -> None:
        """`submit` from a coroutine of the running event loop: the sequence reaches the engine at the end of the
        loop's current iteration, with every other one submitted during it (see the module docs)."""
        if self._forked:
            raise self._stopped_error()
        event_loop = asyncio.get_running_loop()
        with self._lock:
            if not self.alive:
                raise self._stopped_error()
            batch = self._batches.get(event_loop)
            if batch is None:
                batch = self._batches[event_loop] = []
                event_loop.call_soon(self._submit_batch, event_loop)
            batch.append(seq)

    def abort(self, request_id: str) -> None:
        """Asks the engine to end a request; a no-op once the loop stopped (its requests have ended already). A
        request still waiting in an event loop's batch is dropped from it instead: it never reaches the engine, and
        its stream ends with finish_reason "abort" as the engine would end it."""
        if self._forked:  # before taking the lock: another thread of the parent may have held it at the fork
            return
        dropped = None
        with self._lock:
            for event_loop, batch in list(self._batches.items()):
                kept = [seq for seq in batch if seq.request_id != request_id]
                if len(kept) < len(batch):
                    dropped = next(seq for seq in batch if seq.request_id == request_id)
                    if kept:
                        self._batches[event_loop] = kept
                    else:  # its flush finds nothing; a loop that closes first is not kept alive by this entry
                        del self._batches[event_loop]
                    break
        if dropped is not None:
            OutputProcessor.emit(dropped, "", [], None, "abort")  # a consumer already waiting wakes
            self.outbox.flush()
            return
        try:
            self.post(lambda: self.engine.abort(request_id))
        except EngineDeadError:
            pass

    def post(self, fn: Callable[[], Any]) -> futures.Future:
        """Queues `fn` to run in the engine thread between steps, in submission order, and returns at once.

        The future gets fn's result, or the exception it raised: that fails this call alone (and is logged), the
        loop goes on serving. A call still queued when the loop stops gets EngineDeadError."""
        future = futures.Future()
        self._put(_Call(fn, future))
        return future

    def call(self, fn: Callable[[], Any]) -> Any:
        """Runs `fn` in the engine thread between steps and returns its result or raises its exception (for
        inspection and bookkeeping)."""
        return self.post(fn).result()  # resolved even when the loop stops first (EngineDeadError)

    @property
    def _forked(self) -> bool:
        """True in a process forked after the loop started, where its thread does not exist."""
        return os.getpid() != self._pid

    def _submit_batch(self, event_loop: asyncio.AbstractEventLoop) -> None:
        """Runs in `event_loop` at the end of the iteration that submitted the batch: one inbox item for all."""
        with self._lock:
            batch = self._batches.pop(event_loop, None)
            if batch and self.alive:
                self._inbox.put(batch)
                return
        if batch:  # the engine loop stopped meanwhile; its thread flushes the outbox no more
            for seq in batch:
                _tell(seq, self._stopped_error())
            self.outbox.flush()

    def _put(self, item: Sequence | _Call) -> None:
        if self._forked:  # before taking the lock: the engine thread may have held it at the fork
            raise self._stopped_error()
        with self._lock:
            if not self.alive:
                raise self._stopped_error()
            self._inbox.put(item)

    def _stopped_error(self) -> EngineDeadError:
        if self._forked:
            return EngineDeadError(f"this LLM was created in process {self._pid} and its engine thread runs there; "
                                   f"process {os.getpid()} (forked from it) cannot use it: create a new LLM in this "
                                   "process, or start workers with the 'spawn' method")
        if self._dead is not None:
            error = EngineDeadError(f"the engine loop died ({type(self._dead).__name__}: {self._dead}); "
                                    "create a new LLM to continue")
            error.__cause__ = self._dead
            return error
        return EngineDeadError("the LLM was closed; create a new LLM to continue")

    @property
    def stopped(self) -> bool:
        """True once the loop thread has ended (after close, or when it died)."""
        return not self._thread.is_alive()

    def close(self, timeout: float = 30.0) -> None:
        """Stops the loop after the step under way and waits up to `timeout` seconds for its thread to end."""
        self._ask_to_stop()
        self._join(timeout)

    def _ask_to_stop(self) -> None:
        if self._forked:  # the thread, its inbox and its lock belong to the parent process
            self._closed = True
            return
        with self._lock:
            if not self._closed:
                self._closed = True
                self._inbox.put(None)

    def _join(self, timeout: float) -> None:
        if not self._forked and threading.current_thread() is not self._thread:
            self._thread.join(timeout=timeout)

    def _run(self) -> None:
        torch.set_num_threads(self._intra_op_threads)
        try:
            while self._drain(block=not self.engine.has_work()):
                if self.engine.has_work():
                    self._step()
                self.outbox.flush()
        except BaseException as e:  # the loop itself broke: nobody may wait forever
            log.exception("engine loop died")
            with self._lock:
                self._dead = e
        try:
            self._fail_everyone()
        finally:
            self.outbox.flush()

    def _drain(self, block: bool) -> bool:
        """Runs queued calls and adds submitted sequences; False once close() was asked for."""
        try:
            item = self._inbox.get(block=block)
            while True:
                if item is None:
                    return False
                self._run_item(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _run_item(self, item: Sequence | list[Sequence] | _Call) -> None:
        if isinstance(item, _Call):
            item.run()
            return
        for seq in item if isinstance(item, list) else [item]:
            try:
                self.engine.add(seq)
            except Exception as e:  # e.g. a request id already running: this request alone is refused
                log.exception("could not add request %s", seq.request_id)
                _tell(seq, e)

    def _step(self) -> None:
        try:
            self.engine.step()
        except Exception as e:  # e.g. out of memory in the forward: the requests the step ran fail, the rest go on
            log.exception("engine step failed")
            for seq in self.engine.requests_of_failed_step():
                self.engine.fail(seq, e)

    def _fail_everyone(self) -> None:
        """Ends every request and queued call with EngineDeadError: the requests the engine holds and everything
        still in the inbox (the loop stopped, under the lock, so nothing more arrives). A caller is told even when
        the engine's bookkeeping is too broken to end its request the normal way."""
        pending = []
        while not self._inbox.empty():
            item = self._inbox.get_nowait()
            if isinstance(item, _Call):
                if item.future.set_running_or_notify_cancel():
                    item.future.set_exception(self._stopped_error())
            elif isinstance(item, Sequence):
                pending.append(item)
            elif isinstance(item, list):
                pending.extend(item)
        for seq in [*self.engine.running.values(), *pending]:
            error = self._stopped_error()
            try:
                self.engine.fail(seq, error)
            except Exception:
                log.exception("could not end request %s normally", seq.request_id)
                _tell(seq, error)


_fork_guard_registered = False
_open_loops: weakref.WeakSet[EngineLoop] = weakref.WeakSet()  # what _close_open_loops closes at exit
_EXIT_WAIT_S = 30.0  # the longest the interpreter's exit waits for engine threads to finish their steps


@atexit.register
def _close_open_loops() -> None:
    """Closes the engine loops still open when the interpreter exits.

    Their threads are daemons (an LLM left open must not keep the process alive), but a daemon thread still inside a
    step when the interpreter finalises is ended by Python as it takes the GIL back from torch, and that unwinds
    through torch's C++ frames: "terminate called without an active exception", and the process aborts (exit code
    134) instead of exiting. A script that breaks out of a stream, or returns just after its last answer, leaves a
    step running that way. Closing at exit lets the step finish first (within _EXIT_WAIT_S)."""
    loops = list(_open_loops)
    for loop in loops:  # all at once: each finishes its step while the others do
        loop._ask_to_stop()
    deadline = time.monotonic() + _EXIT_WAIT_S
    for loop in loops:
        loop._join(max(0.0, deadline - time.monotonic()))
    if any(not loop.stopped and not loop._forked for loop in loops):
        log.warning("an engine thread was still inside a step %.0f s after the interpreter began to exit; the "
                    "process may abort (\"terminate called without an active exception\"): close LLMs before exiting",
                    _EXIT_WAIT_S)


def _guard_forked_children() -> None:
    """Makes torch single-threaded in processes forked from this one (once an engine was created here).

    GNU OpenMP, which the CPU torch wheels use, is not fork-safe: a child forked after the parent's main thread ran a
    parallel region (loading weights does) hangs in its first parallel op; on torch 2.13 a child's first load of a
    new engine never returned. One thread avoids the pool, as torch's own DataLoader workers do; the child may raise
    it again with torch.set_num_threads. CUDA cannot be used in a forked child at all (torch says so at once)."""
    global _fork_guard_registered
    if not _fork_guard_registered and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=lambda: torch.set_num_threads(1))
        _fork_guard_registered = True


def _tell(seq: Sequence, error: BaseException) -> None:
    """Ends a request's stream with `error` directly, for a request the engine does not hold (or cannot end)."""
    if seq.sink is not None:
        with contextlib.suppress(Exception):  # a sink that cannot take the news has nobody behind it
            seq.sink(CompletionDelta(seq.request_id, "", [], "error", error=error))
