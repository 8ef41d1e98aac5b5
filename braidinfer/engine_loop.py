"""One thread owns the engine (and so the device); callers in any thread or event loop submit to it.

Results flow back through a per-request channel: a `queue.Queue` for threads, or an asyncio queue fed with
`call_soon_threadsafe` for coroutines, so an `async for` consumer needs no thread of its own.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable

from braidinfer.engine import LLMEngine
from braidinfer.errors import EngineDeadError
from braidinfer.outputs import CompletionChunk
from braidinfer.sequence import Sequence

log = logging.getLogger(__name__)


class SyncChannel:
    def __init__(self):
        self._queue: queue.Queue[CompletionChunk] = queue.Queue()

    def put(self, chunk: CompletionChunk) -> None:
        self._queue.put(chunk)

    def get(self) -> CompletionChunk:
        return self._queue.get()


class AsyncChannel:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue[CompletionChunk] = asyncio.Queue()

    def put(self, chunk: CompletionChunk) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, chunk)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
            pass

    async def get(self) -> CompletionChunk:
        return await self._queue.get()


class EngineLoop:
    """Runs `engine.step()` in a daemon thread while there is work; sleeps on its inbox otherwise."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._dead: BaseException | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="braid-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._dead is None and not self._closed

    def submit(self, seq: Sequence) -> None:
        self._call(lambda: self.engine.add(seq))

    def abort(self, request_id: str) -> None:
        if self.alive:
            self._call(lambda: self.engine.abort(request_id))

    def post(self, fn: Callable[[], None]) -> None:
        """Queues `fn` to run in the engine thread between steps, in submission order, without waiting for it."""
        self._call(fn)

    def call(self, fn: Callable[[], object]) -> object:
        """Runs `fn` in the engine thread between steps and returns its result (for inspection and bookkeeping)."""
        done, box = threading.Event(), {}

        def run():
            try:
                box["value"] = fn()
            except BaseException as e:  # handed back to the caller
                box["error"] = e
            done.set()

        self._call(run)
        while not done.wait(0.1):
            if not self.alive:
                raise EngineDeadError("the engine loop stopped before answering") from self._dead
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _call(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if not self.alive:
                raise EngineDeadError("the engine loop is not running") from self._dead
            self._inbox.put(fn)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._inbox.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            while True:
                if not self._drain(block=not self.engine.has_work()):
                    break
                if self.engine.has_work():
                    self._step()
        except BaseException as e:  # the loop itself broke: nobody may wait forever
            log.exception("engine loop died")
            with self._lock:
                self._dead = e
            self.engine.fail_all(EngineDeadError(f"the engine loop died: {type(e).__name__}: {e}"))
            return
        self.engine.fail_all(EngineDeadError("the engine was closed"))

    def _drain(self, block: bool) -> bool:
        """Runs queued calls; False once close() was asked for."""
        try:
            fn = self._inbox.get(block=block)
            while True:
                if fn is None:
                    return False
                fn()
                fn = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _step(self) -> None:
        try:
            self.engine.step()
        except Exception as e:  # a failing step fails its requests; the engine keeps serving
            log.exception("engine step failed")
            self.engine.fail_all(e)
