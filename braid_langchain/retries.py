"""ChatBraid's `timeout` and `max_retries`: per-call deadlines and retries of transient engine failures (tenacity).

Transient, so retried: a request failed by a CUDA out-of-memory error in its engine step (the engine keeps serving,
and memory may be free a moment later), and an engine whose loop died (the engine registry loads a fresh one on
the next call). Never retried: invalid requests, timeouts, an engine that was closed (the user's decision: a retry
would load it again), and anything else the engine raises on purpose.

A deadline is a `time.monotonic()` value (None = none); running past it raises
`braidinfer.errors.RequestTimeoutError`, a `TimeoutError`.
"""
from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable
from concurrent import futures
from typing import Any, TypeVar

from tenacity import AsyncRetrying, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

T = TypeVar("T")

_FIRST_WAIT_S = 0.05
_BACKOFF = wait_exponential(multiplier=_FIRST_WAIT_S, max=2.0)  # 0.05 s, 0.1 s, ... like an HTTP client's backoff
_LATER_BACKOFF = wait_exponential(multiplier=2 * _FIRST_WAIT_S, max=2.0)  # _BACKOFF's waits from the second on
_executor: futures.ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def is_transient(error: BaseException) -> bool:
    """Whether a failed call may succeed when tried again (see the module docs)."""
    from braidinfer.errors import EngineDeadError, RequestFailedError

    if isinstance(error, EngineDeadError):  # its loop died of its cause; without one, it was closed
        return error.__cause__ is not None
    if isinstance(error, RequestFailedError):  # the engine wraps what broke inside a step as the cause
        return any(cls.__name__ == "OutOfMemoryError" for cls in type(error.__cause__).__mro__)
    return False


def retrying(max_retries: int) -> Retrying:
    """Calls a function, retrying it up to `max_retries` times on transient failures; the last error is re-raised."""
    return Retrying(retry=retry_if_exception(is_transient), stop=stop_after_attempt(max_retries + 1), wait=_BACKOFF,
                    reraise=True)


def aretrying(max_retries: int) -> AsyncRetrying:
    """`retrying` for coroutine functions."""
    return AsyncRetrying(retry=retry_if_exception(is_transient), stop=stop_after_attempt(max_retries + 1),
                         wait=_BACKOFF, reraise=True)


async def acall(max_retries: int, fn: Callable[[], Awaitable[T]]) -> T:
    """`await aretrying(max_retries)(fn)`, same attempts and waits, with the first attempt outside tenacity: a
    call that does not fail (nearly all) then skips tenacity's bookkeeping, which otherwise runs on every step of
    the awaited call (each engine delta)."""
    try:
        return await fn()
    except Exception as e:
        if max_retries == 0 or not is_transient(e):
            raise
    await asyncio.sleep(_FIRST_WAIT_S)
    return await AsyncRetrying(retry=retry_if_exception(is_transient), stop=stop_after_attempt(max_retries),
                               wait=_LATER_BACKOFF, reraise=True)(fn)


def remaining(deadline: float | None) -> float | None:
    """Seconds left before `deadline` (None: no deadline); raises RequestTimeoutError once it has passed."""
    import time

    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise _timeout_error()
    return left


def call_within(deadline: float | None, fn: Callable[[], T]) -> T:
    """fn() (blocking engine work that takes no deadline itself, e.g. pinning), given up on at `deadline`.

    With a deadline fn runs in a worker thread; past the deadline the caller gets RequestTimeoutError and fn
    finishes on its own (a pin that completes late stays pinned, for later calls); one still queued behind busy
    workers never runs."""
    if deadline is None:
        return fn()
    left = remaining(deadline)
    future = _pool().submit(fn)
    try:
        return future.result(timeout=left)
    except futures.TimeoutError:
        future.cancel()  # no-op once it runs
        raise _timeout_error() from None


async def within(deadline: float | None, make: Callable[[], Awaitable[T]]) -> T:
    """await make(), cancelled at `deadline` (cancelling an engine request aborts it and frees its pages)."""
    if deadline is None:
        return await make()
    left = remaining(deadline)
    try:
        return await asyncio.wait_for(make(), left)
    except _timeout_type():
        raise
    except asyncio.TimeoutError:
        raise _timeout_error() from None


def _pool() -> futures.ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="braid-pin")
        return _executor


def _forget_parent_pool() -> None:
    """Runs in a forked child: the parent's pool came along without its worker threads (work submitted to it would
    never run), and its lock may have been held by a parent thread at the fork; the child makes its own on use."""
    global _executor, _executor_lock
    _executor, _executor_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX only; elsewhere processes are spawned, not forked
    os.register_at_fork(after_in_child=_forget_parent_pool)


def _timeout_type() -> Any:
    from braidinfer.errors import RequestTimeoutError

    return RequestTimeoutError


def _timeout_error() -> Exception:
    return _timeout_type()("the call ran past its ChatBraid timeout; its request was aborted")
