"""The heap a loaded engine leaves, kept out of Python's cyclic garbage collector while engines serve.

With torch, transformers and a model loaded, a process holds about half a million objects the collector tracks, and a
full (oldest-generation) collection scans every one of them: a few hundred milliseconds during which no thread runs
Python, so the engine stops stepping and every caller waits. Serving allocates fast enough that such collections come
round again and again. Once an engine is loaded, `freeze` collects once and moves everything alive to the permanent
generation (`gc.freeze`, as vLLM and SGLang do after start-up), so that later collections scan only what was allocated
since.

Frozen objects are never collected, and a closing engine's weights and CUDA graphs hold reference cycles that only the
collector frees: `thawed` unfreezes everything for the closing engine's collection, and freezes again while other
engines still hold a freeze. At exit the heap is unfrozen too (extension modules that check for leaked objects at
shutdown, e.g. nanobind's, would report every frozen one).
"""
from __future__ import annotations

import atexit
import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_holders = 0  # engines alive that froze the heap
atexit.register(gc.unfreeze)


def freeze() -> None:
    """Collects garbage once, then freezes every object alive (held until `thawed(release=True)`)."""
    global _holders
    with _lock:
        gc.collect()
        gc.freeze()
        _holders += 1


@contextmanager
def thawed(release: bool) -> Iterator[None]:
    """Nothing frozen inside the block (a closing engine collects its cycles there); `release`: the caller held a
    freeze, which ends here. Afterwards everything alive is frozen again if some other engine still holds one."""
    global _holders
    with _lock:
        if release:
            _holders -= 1
        gc.unfreeze()
        try:
            yield
        finally:
            if _holders > 0:
                gc.freeze()
