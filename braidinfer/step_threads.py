"""Intra-op threads per CPU step: decode steps run on fewer threads than prefill steps.

A decode step of a small model is hundreds of tiny ops, each split over threads only if the threads wake fast.
torch's OpenMP (libgomp) gives every thread that splits an op a team of worker threads of its own, and once the
process's OpenMP threads outnumber the cores it stops letting idle workers spin, so each split op waits for its
worker to be woken. LLM builds a CPU engine without giving its caller a team (`without_workers`), and then the
embedded SmolLM2-135M decoded 21% faster on two intra-op threads than on one on a 2-core machine (57.1 against 47.1
tok/s); but with a second team in the process (any other thread splitting torch ops, e.g. an embedding model on
the CPU) two threads fell to ~29 tok/s. So decode steps (every row one new token) run on
EngineConfig.cpu_decode_threads, by default one, and any other step on the count the engine's thread already had (a
1,800-token prefill took 1.6-1.7x longer on one thread; benchmarks/RESULTS.md). The step's one large product, the
logits (its 49152 x 576 int4 lm_head term: 1.54 ms on one thread, 0.80 ms on two, 0.74 ms saved per term with the
switch to two threads and back counted), runs inside `wide()` on the engine thread's own count again.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

DEFAULT_DECODE_THREADS = 1


class StepThreads:
    """Sets torch's intra-op thread count around each CPU decode step and restores it after (also when the step
    raises), so that a caller stepping the engine on its own thread gets its count back.

    torch.set_num_threads sets OpenMP's and MKL's counts for the calling thread only (the engine's thread: other
    threads keep theirs), but also torch's process-wide default, which a thread that starts using torch's intra-op
    parallelism during a decode step takes up as its own. On CUDA this does nothing."""

    def __init__(self, device: torch.device, decode_threads: int | None):
        self.active = device.type == "cpu"
        self.decode_threads = decode_threads or DEFAULT_DECODE_THREADS
        self._outer: int | None = None  # during a decode step that changed the count: the count before it

    @contextmanager
    def for_step(self, num_new_tokens: list[int]) -> Iterator[None]:
        """Runs the body on decode_threads when every row of the step adds one token (a decode step)."""
        if not self.active or any(n != 1 for n in num_new_tokens):  # CUDA, or a prefill step
            yield
            return
        before = torch.get_num_threads()
        if before == self.decode_threads:
            yield
            return
        self._outer = before
        try:
            with num_threads(self.decode_threads):
                yield
        finally:
            self._outer = None

    @contextmanager
    def wide(self) -> Iterator[None]:
        """Inside a decode step whose count is below the one it started from, runs the body on the latter (for one
        large product, whose split over threads pays for waking them); elsewhere, and on CUDA, nothing changes."""
        if self._outer is None or self._outer <= self.decode_threads:
            yield
            return
        with num_threads(self._outer):
            yield


@contextmanager
def num_threads(count: int) -> Iterator[None]:
    """Runs the body on `count` intra-op threads of the calling thread, its count before restored after (also when
    the body raises)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def without_workers(device: torch.device) -> Iterator[int]:
    """A context for building a CPU engine on a thread that will not run it (LLM's caller; the engine runs on its
    own thread): the body runs on one intra-op thread, the caller's count restored after; it yields that count, for
    the engine's thread to set as its own when it starts (torch.set_num_threads also sets torch's process-wide
    default, which a thread starting inside the body would otherwise keep). torch's OpenMP (libgomp) gives a thread
    its own team of worker threads the first time it splits an op; the team outlives the op, and once the process's
    OpenMP threads outnumber the cores libgomp lets idle workers spin only briefly, so each op the engine thread
    splits then waits for its worker to be woken. Built this way (load ~6% slower), the caller starts no team: on a
    2-core machine the embedded model decoded with cpu_decode_threads=2 at 56.6-57.6 tok/s instead of 29.5 (44-47 on
    one thread), as long as no other thread of the process splits torch ops (benchmarks/RESULTS.md). On CUDA the
    count is left as it is."""
    before = torch.get_num_threads()
    if device.type != "cpu":
        yield before
        return
    with num_threads(1):
        yield before
