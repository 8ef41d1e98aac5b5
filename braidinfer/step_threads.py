"""Intra-op threads per CPU step: decode steps may run on fewer threads than prefill steps.

A decode step of a small model is hundreds of tiny ops, each split over threads only if the threads wake fast.
torch's OpenMP (libgomp) gives every thread that splits an op a team of worker threads of its own, and once the
process's OpenMP threads outnumber the cores it stops letting idle workers spin, so each split op waits for its
worker to be woken. LLM builds a CPU engine without giving its caller a team (`without_workers`), and then the
embedded SmolLM2-135M decoded ~20% faster on two intra-op threads than on one on a 2-core machine; but with a second
team in the process (any other thread splitting torch ops, e.g. an embedding model on the CPU) two threads fell to
about 0.6x one thread's speed. Which count is faster is therefore not known in advance: by default decode steps
(every row one new token) measure it (`ThreadCountChooser`: 1, 2, 4, ... up to the engine thread's count, the
fastest kept and re-measured after 512 to 4,096 steps); EngineConfig.cpu_decode_threads fixes it instead. Any other
step runs on the count the engine's thread already had (a 1,800-token prefill took 1.6-1.7x longer on one thread;
benchmarks/RESULTS.md). On a decode count below that, the step's one large product, the logits (its 49152 x 576
int4 lm_head term: 1.54 ms on one thread, 0.80 ms on two), runs inside `wide()` on the engine thread's count again.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StepThreads:
    """Sets torch's intra-op thread count around each CPU decode step and restores it after (also when the step
    raises), so that a caller stepping the engine on its own thread gets its count back.

    decode_threads: the count for every decode step, or None to measure: decode steps then try 1 and the powers of
    two up to the engine thread's own count in turn and keep the fastest (`ThreadCountChooser`), so two threads are
    used where they pay and one where a second team in the process makes them slow.

    torch.set_num_threads sets OpenMP's and MKL's counts for the calling thread only (the engine's thread: other
    threads keep theirs), but also torch's process-wide default, which a thread that starts using torch's intra-op
    parallelism during a decode step takes up as its own. On CUDA this does nothing."""

    def __init__(self, device: torch.device, decode_threads: int | None):
        self.active = device.type == "cpu"
        self.decode_threads = decode_threads
        self.chooser = ThreadCountChooser()
        self._outer: int | None = None  # during a decode step that changed the count: the count before it

    @contextmanager
    def for_step(self, num_new_tokens: list[int]) -> Iterator[None]:
        """Runs the body on the decode count when every row of the step adds one token (a decode step)."""
        if not self.active or any(n != 1 for n in num_new_tokens):  # CUDA, or a prefill step
            yield
            return
        before = torch.get_num_threads()
        if self.decode_threads is not None:
            count, key = self.decode_threads, None
        else:
            key = (_rows_bucket(len(num_new_tokens)), before)
            count = self.chooser.count(key, candidates(before))
        self._outer = before if count != before else None
        start = time.perf_counter()
        try:
            with num_threads(count):
                yield
        finally:
            self._outer = None
        if key is not None:  # not reached when the body raised
            self.chooser.record(key, count, time.perf_counter() - start)

    @contextmanager
    def wide(self) -> Iterator[None]:
        """Inside a decode step whose count is below the one it started from, runs the body on the latter (for one
        large product, whose split over threads pays for waking them); elsewhere, and on CUDA, nothing changes."""
        if self._outer is None or self._outer <= torch.get_num_threads():
            yield
            return
        with num_threads(self._outer):
            yield


def candidates(outer: int) -> tuple[int, ...]:
    """The decode counts tried under an engine thread of `outer` intra-op threads: 1, 2, 4, ... and outer."""
    counts = [1]
    while counts[-1] * 2 < outer:
        counts.append(counts[-1] * 2)
    return tuple(counts + [outer]) if outer > 1 else (1,)


def _rows_bucket(rows: int) -> int:
    """Decode steps of similar row counts share their measurements: 1, 2, 3-4, 5-8, ... rows."""
    return 1 << (rows - 1).bit_length()


class ThreadCountChooser:
    """Picks each decode step's intra-op count by timing steps, per key (the engine's: rows bucket, starting count).

    A key first explores: ROUNDS rounds in which every candidate count runs BLOCK consecutive steps (the order
    reversed every other round, so that a step time drifting with the context length favours no count), the first
    step of each block not counted (it pays for switching). The count with the lowest median step time then runs
    the key's next EXPLOIT steps, after which the key explores again, since what is fastest changes when another
    thread of the process starts or stops splitting torch ops, or the machine gets busy. Later explorations try only
    the chosen count and its neighbours among the candidates (on many cores, not every count again), and each one
    that keeps the choice doubles the steps before the next, up to MAX_EXPLOIT."""

    BLOCK = 3
    ROUNDS = 2
    EXPLOIT = 512
    MAX_EXPLOIT = 4096

    def __init__(self):
        self._keys: dict[tuple, _KeyState] = {}

    def count(self, key: tuple, counts: tuple[int, ...]) -> int:
        """The count the next step of `key` should run on (one of `counts`, the candidates)."""
        state = self._keys.get(key)
        if state is None or state.counts != counts:
            state = self._keys[key] = _KeyState(counts, self.BLOCK, self.ROUNDS)
        return state.next_count()

    def record(self, key: tuple, count: int, seconds: float) -> None:
        """The step of `key` that `count` returned `count` for took `seconds`."""
        state = self._keys.get(key)
        if state is not None:
            state.record(count, seconds, self.EXPLOIT, self.MAX_EXPLOIT)

    def chosen(self, key: tuple) -> int | None:
        """The count `key` last settled on (None while it has not finished exploring once)."""
        state = self._keys.get(key)
        return None if state is None else state.best


class _KeyState:
    def __init__(self, counts: tuple[int, ...], block: int, rounds: int):
        self.counts, self.block, self.rounds = counts, block, rounds
        self.best: int | None = None
        self.interval = 0  # steps on `best` between explorations
        self._explore(counts)

    def _explore(self, tried: tuple[int, ...]) -> None:
        self.tried = tried
        self.schedule = [c for r in range(self.rounds) for c in (tried if r % 2 == 0 else tried[::-1])
                         for _ in range(self.block)] if len(tried) > 1 else []
        self.position = 0
        self.samples: dict[int, list[float]] = {c: [] for c in tried}
        self.left = -1  # steps left on `best` before exploring again; -1: never (while exploring, or one count)
        if len(tried) == 1:
            self.best = tried[0]

    def next_count(self) -> int:
        if self.position < len(self.schedule):
            return self.schedule[self.position]
        return self.best

    def record(self, count: int, seconds: float, exploit: int, max_exploit: int) -> None:
        if self.position < len(self.schedule):
            if count == self.schedule[self.position]:
                if self.position % self.block:  # the block's first step paid for the switch
                    self.samples[count].append(seconds)
                self.position += 1
                if self.position == len(self.schedule):
                    best = min(self.tried, key=lambda c: statistics.median(self.samples[c]))
                    self.interval = min(2 * self.interval, max_exploit) if best == self.best else exploit
                    self.best, self.left = best, self.interval
            return
        if self.left > 0:
            self.left -= 1
            if self.left == 0:
                i = self.counts.index(self.best)
                self._explore(self.counts[max(0, i - 1):i + 2])


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
