"""Which prompt prefixes ChatBraid pins: the system prompt and each document after it, as a chain of engine chunks.

The engine reuses any cached prefix, but unpinned pages are evicted under pressure; pinning the segments that many
calls share (the system prompt, then the documents in their stable order) keeps them computed. Segment ends are
found by rendering the system message without documents, then with the first 1, 2, ... documents, and taking the
longest common token prefix with the real prompt, so they are exact token prefixes whatever the tokenizer merges.

Pins are best effort: a registry per engine keeps the most recently used chunks (LRU, bounded); when the engine
refuses a pin (its pin budget is full) the oldest half is released and the call goes on unpinned.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from braidinfer.errors import InvalidRequestError, OutOfPagesError

if TYPE_CHECKING:
    from braidinfer import LLM
    from braidinfer.chunks import Chunk

MAX_PINNED_CHUNKS = 64
"""Most chunks ChatBraid keeps pinned per engine (least recently used ones are released first)."""

_REFUSED = (OutOfPagesError, InvalidRequestError)  # how the engine refuses a pin (its pin budget is full)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def segment_ends(prompt: list[int], heads: Sequence[tuple[list[int], str]]) -> list[tuple[int, str]]:
    """(end, kind) of each segment of `prompt`: the common prefix length of the prompt with each head rendering,
    strictly increasing (a head that adds nothing is dropped; the prompt's last token never belongs to a segment,
    it is always computed)."""
    out, last = [], 0
    for ids, kind in heads:
        end = min(common_prefix_length(prompt, ids), len(prompt) - 1)
        if end > last:
            out.append((end, kind))
            last = end
    return out


class PrefixPins:
    """The chunks ChatBraid pinned on one engine, keyed by their whole token prefix."""

    def __init__(self, llm: LLM, max_chunks: int = MAX_PINNED_CHUNKS):
        self.llm = llm
        self.max_chunks = max_chunks
        self._chunks: OrderedDict[tuple[int, ...], Chunk] = OrderedDict()
        self._lock = threading.Lock()

    def pin(self, prompt: list[int], segments: Sequence[tuple[int, str]]) -> None:
        """Makes sure prompt[:end] is pinned for every (end, kind) segment (creating chunks as needed)."""
        parent = None
        for end, kind in self._useful(segments):
            chunk = self._lookup(prompt, end)
            if chunk is None:
                try:
                    chunk = self.llm.chunks.add(self._own(prompt, end, parent), after=parent, kind=kind)
                except _REFUSED:
                    self._release_oldest_half()  # make room for next time
                    return
                chunk = self._store(prompt, end, chunk)
            parent = chunk

    async def apin(self, prompt: list[int], segments: Sequence[tuple[int, str]]) -> None:
        """`pin` for asyncio (the prefills do not block the event loop)."""
        parent = None
        for end, kind in self._useful(segments):
            chunk = self._lookup(prompt, end)
            if chunk is None:
                try:
                    chunk = await self.llm.chunks.aadd(self._own(prompt, end, parent), after=parent, kind=kind)
                except _REFUSED:
                    self._release_oldest_half()
                    return
                chunk = self._store(prompt, end, chunk)
            parent = chunk

    def release_all(self) -> None:
        with self._lock:
            chunks = list(self._chunks.values())
            self._chunks.clear()
        for chunk in chunks:
            chunk.release()

    def __len__(self) -> int:
        return len(self._chunks)

    # --- internals ---------------------------------------------------------------------------------------------
    def _useful(self, segments: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
        """Segments that add at least one full page (a shorter one would pin nothing of its own)."""
        page, out, last_pages = self.llm.config.page_size, [], 0
        for end, kind in segments:
            if end // page > last_pages:
                out.append((end, kind))
                last_pages = end // page
        return out

    @staticmethod
    def _own(prompt: list[int], end: int, parent: Chunk | None) -> list[int]:
        return prompt[parent.num_prefix_tokens if parent else 0 : end]

    def _lookup(self, prompt: list[int], end: int) -> Chunk | None:
        key = tuple(prompt[:end])
        with self._lock:
            chunk = self._chunks.get(key)
            if chunk is not None and chunk.released:  # released from outside (e.g. llm.chunks.release_all)
                del self._chunks[key]
                chunk = None
            if chunk is not None:
                self._chunks.move_to_end(key)
        return chunk

    def _store(self, prompt: list[int], end: int, chunk: Chunk) -> Chunk:
        key, evicted = tuple(prompt[:end]), []
        with self._lock:
            existing = self._chunks.get(key)
            if existing is not None and not existing.released:  # another caller pinned it meanwhile
                evicted.append(chunk)
                chunk = existing
            self._chunks[key] = chunk
            self._chunks.move_to_end(key)
            while len(self._chunks) > self.max_chunks:
                evicted.append(self._chunks.popitem(last=False)[1])
        for old in evicted:
            old.release()
        return chunk

    def _release_oldest_half(self) -> None:
        with self._lock:
            old = [self._chunks.popitem(last=False)[1] for _ in range((len(self._chunks) + 1) // 2)]
        for chunk in old:
            chunk.release()


_registry: weakref.WeakKeyDictionary[Any, PrefixPins] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()


def pins_for(llm: LLM) -> PrefixPins:
    """The pin registry of one engine."""
    with _registry_lock:
        pins = _registry.get(llm)
        if pins is None:
            pins = _registry[llm] = PrefixPins(llm)
        return pins
