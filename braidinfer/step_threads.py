"""Intra-op threads per CPU step: decode steps run on fewer threads than prefill steps.

A decode step of a small model is hundreds of tiny ops; splitting each over threads costs more than it saves. On a
2-core machine the embedded SmolLM2-135M decoded 1.5x faster on one intra-op thread than on two (means of A/B runs in
one process), while a 1,800-token prefill took 1.6-1.7x longer on one (benchmarks/RESULTS.md). So a step whose
every row decodes one token runs on EngineConfig.cpu_decode_threads, and any other step on the count the engine's
thread already had. The step's one large product, the logits (its 49152 x 576 int4 lm_head term: 1.54 ms on one
thread, 0.80 ms on two, 0.74 ms saved per term with the switch to two threads and back counted), runs inside
`wide()` on the engine thread's own count again.
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
        torch.set_num_threads(self.decode_threads)
        self._outer = before
        try:
            yield
        finally:
            self._outer = None
            torch.set_num_threads(before)

    @contextmanager
    def wide(self) -> Iterator[None]:
        """Inside a decode step whose count is below the one it started from, runs the body on the latter (for one
        large product, whose split over threads pays for waking them); elsewhere, and on CUDA, nothing changes."""
        if self._outer is None or self._outer <= self.decode_threads:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(self._outer)
        try:
            yield
        finally:
            torch.set_num_threads(before)
