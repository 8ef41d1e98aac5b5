"""Worker processes: a process forked after an engine loaded inherits the engine object but not its thread. An `LLM`
used there raises EngineDeadError at once (naming the owning process) instead of waiting forever; a ChatBraid there
gets a fresh engine from the registry, loaded on first use, that answers as the parent's does. Spawned workers start
from nothing and load their own engine.

Each worker's join carries a hang guard: a regression (a worker waiting on a thread that does not exist) fails the
test instead of hanging the suite."""
from __future__ import annotations

import multiprocessing
import os
import queue
import threading

import pytest
from langchain_core.messages import HumanMessage

from braid_langchain import ChatBraid, engines
from braidinfer import LLM, SamplingParams
from braidinfer.errors import EngineDeadError

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPT = [11, 22, 33, 44, 55]
QUESTION = [HumanMessage("Name a colour.")]
HANG_GUARD_S = 300  # far above a worker's normal run (a few seconds); reached only when a worker hangs


def _report(results, fn) -> None:
    """Runs `fn` in the worker and sends back ("ok", value) or ("error", type name, message, pid)."""
    try:
        results.put(("ok", fn()))
    except Exception as e:
        results.put(("error", type(e).__name__, str(e), os.getpid()))


def _generate_with(llm: LLM, results) -> None:
    _report(results, lambda: llm.generate(PROMPT, GREEDY)[0].token_ids)


def _generate_fresh(model: str, results) -> None:
    def run():
        with LLM(model=model, device="cpu") as llm:
            return llm.generate(PROMPT, GREEDY)[0].token_ids
    _report(results, run)


def _chat(model: str, results) -> None:
    _report(results, lambda: ChatBraid(model=model, device="cpu", temperature=0, max_tokens=8).invoke(QUESTION).content)


def _run_worker(method: str, target, *args):
    """Runs `target(*args, results)` in a `method` worker; returns what it reported."""
    ctx = multiprocessing.get_context(method)
    results = ctx.Queue()
    worker = ctx.Process(target=target, args=(*args, results))
    worker.start()
    try:
        result = results.get(timeout=HANG_GUARD_S)
        worker.join(HANG_GUARD_S)
        assert not worker.is_alive(), f"the {method} worker did not exit"
    except queue.Empty:
        pytest.fail(f"the {method} worker reported nothing: it hangs")
    finally:
        if worker.is_alive():
            worker.terminate()
            worker.join()
    assert worker.exitcode == 0
    return result


@pytest.fixture(scope="module")
def parent_llm(qwen3_chat_model):
    """An engine loaded, and used, in the test process before any worker starts."""
    with LLM(model=qwen3_chat_model, device="cpu") as llm:
        yield llm


def test_llm_in_forked_worker_fails_at_once(parent_llm):
    expected = parent_llm.generate(PROMPT, GREEDY)[0].token_ids  # the engine thread has run
    result = _run_worker("fork", _generate_with, parent_llm)
    assert result[0] == "error" and result[1] == EngineDeadError.__name__
    message, child_pid = result[2], result[3]
    assert f"process {os.getpid()}" in message and f"process {child_pid}" in message
    assert "create a new LLM" in message
    # The parent's engine is untouched by the child's attempt.
    assert parent_llm.alive
    assert parent_llm.generate(PROMPT, GREEDY)[0].token_ids == expected


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_new_llm_in_worker_matches_parent(parent_llm, qwen3_chat_model, method):
    expected = parent_llm.generate(PROMPT, GREEDY)[0].token_ids
    assert _run_worker(method, _generate_fresh, qwen3_chat_model) == ("ok", expected)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_chat_braid_in_worker_gets_its_own_engine(qwen3_chat_model, method):
    chat = ChatBraid(model=qwen3_chat_model, device="cpu", temperature=0, max_tokens=8)
    expected = chat.invoke(QUESTION).content  # the registry's engine is loaded and running in this process
    try:
        assert engines.is_loaded(qwen3_chat_model, "cpu")
        assert _run_worker(method, _chat, qwen3_chat_model) == ("ok", expected)
        assert chat.invoke(QUESTION).content == expected  # and the parent's engine still serves
    finally:
        engines.close_engine(qwen3_chat_model, "cpu")


def test_forked_loop_is_not_alive(parent_llm):
    """`alive` answers per process: the registry relies on it to replace an inherited engine."""
    result = _run_worker("fork", _report_alive, parent_llm)
    assert result == ("ok", False)
    assert parent_llm.alive


def _report_alive(llm: LLM, results) -> None:
    _report(results, lambda: llm.alive)


def test_a_child_forked_while_the_loop_lock_was_held_can_close_an_inherited_stream(parent_llm):
    """The fork copies the engine loop's lock in whatever state another thread left it: held, it never opens in the
    child, so nothing there may wait on it (closing a stream aborts its request)."""
    stream = parent_llm.stream_deltas(PROMPT, SamplingParams(max_tokens=64, ignore_eos=True))
    next(stream)
    held, release = threading.Event(), threading.Event()

    def inside_the_lock():  # stands for a parent thread in the middle of a submit at the fork
        with parent_llm._loop._lock:
            held.set()
            release.wait()

    holder = threading.Thread(target=inside_the_lock, daemon=True)
    holder.start()
    held.wait()
    try:
        result = _run_worker("fork", _close_inherited, stream)
    finally:
        release.set()
        holder.join()
        stream.close()
    assert result == ("ok", "closed")


def _close_inherited(stream, results) -> None:
    _report(results, lambda: (stream.close(), "closed")[1])
