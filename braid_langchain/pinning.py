"""Which prompt prefixes ChatBraid pins: the system prompt and each document after it, as a chain of engine chunks.

The engine reuses any cached prefix, but unpinned pages are evicted under pressure; pinning the segments that many
calls share (the system prompt, then the documents in their stable order) keeps them computed. Segment ends are
found by rendering the system message without documents, then with the first 1, 2, ... documents, and taking the
longest common token prefix with the real prompt, so they are exact token prefixes whatever the tokenizer merges.

Those head renderings depend only on the system prompt, the documents and the tools, which repeat across calls: they
are kept per engine (LRU), so a call whose system prompt and documents were seen before renders the chat template
once, for its own prompt. A prompt that starts with a known head tuple (`prompt_cache.split_prompt_ids`) is compared
with them only past it: where each rendering leaves that head is kept with them.

Pins are best effort: a registry per engine keeps the most recently used chunks (LRU, bounded); when the engine
refuses a pin (its pin budget is full) the oldest half is released and the call goes on unpinned; when it refuses one
for now (a started request needs the room: PinWouldStarveError) the call goes on unpinned and no pin is released.
The registry refers to its engine weakly, so it never keeps a closed or dropped engine (weights, KV pages) alive;
`drop_pins` releases an engine's pins and forgets them when `engines` closes it.

Usage accounting: a pin prefill computes part of the prompt before the call's request runs, and the engine then
counts that part as read from the cache. So when a call has to prefill, `pin` first asks the engine how much of the
prompt was cached before, and returns it as the most the call may report as `cache_read`.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

from braidinfer.errors import EngineDeadError, InvalidRequestError, OutOfPagesError, PinWouldStarveError

from braid_langchain.documents import document_key, render_sorted_documents
from braid_langchain.messages import content_text, to_chat_messages

if TYPE_CHECKING:
    from braidinfer import LLM
    from braidinfer.chunks import Chunk

MAX_PINNED_CHUNKS = 64
"""Most chunks ChatBraid keeps pinned per engine (least recently used ones are released first)."""
MAX_CACHED_HEADS = 256
"""Most system-prompt-and-documents renderings kept per engine (least recently used ones are dropped first)."""

_REFUSED = (OutOfPagesError, InvalidRequestError)  # how the engine refuses a pin (its pin budget is full)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if (a if len(a) == n else a[:n]) == (b if len(b) == n else b[:n]):  # the usual case, compared in C
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def segment_ends(prompt: list[int], heads: Sequence[tuple[list[int], str]]) -> list[tuple[int, str]]:
    """(end, kind) of each segment of `prompt`: the common prefix length of the prompt with each head rendering,
    strictly increasing (a head that adds nothing is dropped; the prompt's last token never belongs to a segment,
    it is always computed)."""
    return _increasing([(common_prefix_length(prompt, ids), kind) for ids, kind in heads], len(prompt))


def _increasing(common: list[tuple[int, str]], prompt_len: int) -> list[tuple[int, str]]:
    out, last = [], 0
    for length, kind in common:
        end = min(length, prompt_len - 1)
        if end > last:
            out.append((end, kind))
            last = end
    return out


class HeadRenderings:
    """The head renderings (token ids, kind) of one system prompt with its first 0, 1, ... documents, and how each
    continues the last prompt head it met (a tuple the prompts start with)."""

    def __init__(self, renderings: list[tuple[list[int], str]]):
        self.renderings = renderings
        # (head, [(common prefix length with the head, the rendering past the head if it holds all of it, kind)]);
        # one slot: calls with one system prompt and documents share one head.
        self._past: tuple[tuple[int, ...], list[tuple[int, list[int] | None, str]]] | None = None

    def ends(self, prompt: list[int], head: tuple[int, ...] = ()) -> list[tuple[int, str]]:
        """`segment_ends(prompt, self.renderings)` for a prompt that starts with `head`: the renderings are compared
        with the head once, and with each prompt only past it."""
        if not head:
            return segment_ends(prompt, self.renderings)
        past = self._past
        if past is None or past[0] is not head:
            past = self._past = (head, [_past_head(head, ids, kind) for ids, kind in self.renderings])
        n, tail = len(head), prompt[len(head):]
        return _increasing([(length if rest is None else n + common_prefix_length(tail, rest), kind)
                            for length, rest, kind in past[1]], len(prompt))


def _past_head(head: tuple[int, ...], ids: list[int], kind: str) -> tuple[int, list[int] | None, str]:
    length = common_prefix_length(list(head), ids)
    return length, ids[len(head):] if length == len(head) else None, kind


def segment_heads(llm: LLM, prompt: list[int], messages: Sequence[Any], base: Sequence[str], documents: Sequence[Any],
                  template_kwargs: dict[str, Any], head: tuple[int, ...] = ()) -> list[tuple[int, str]]:
    """(end, kind) of the system prompt and of each document in `prompt` (see `segment_ends`): the leading system
    messages of `messages` are rendered with `base` extras and the first 0, 1, ... of `documents` (already in
    `sort_documents` order, as in the prompt), once per engine and distinct input (cached). `head`: ids that
    `prompt` starts with (see `HeadRenderings.ends`)."""
    lead = []
    for message in messages:
        if message.type != "system":
            break
        lead.append(message)
    # The key holds each text once, as the caller's own string objects (the heads repeat the system prompt and every
    # earlier document): a str caches its hash, so looking up a known system prompt and documents costs no pass over
    # their text. The heads themselves are built only when they are not stored yet.
    key = (tuple(content_text(m.content) for m in lead), tuple(base), tuple(map(document_key, documents)),
           repr(template_kwargs))

    def render() -> HeadRenderings:
        heads = [to_chat_messages(lead, system_extras=[*base, render_sorted_documents(documents[:i])])
                 for i in range(len(documents) + 1)]
        return HeadRenderings(_render_heads(llm, heads, template_kwargs))

    return pins_for(llm).heads(key, render).ends(prompt, head)


def _render_heads(llm: LLM, heads: list[list[dict[str, Any]]], template_kwargs: dict[str, Any]
                  ) -> list[tuple[list[int], str]]:
    return [(llm.apply_chat_template(head, add_generation_prompt=False, **template_kwargs),
             "document" if i else "system") for i, head in enumerate(heads) if head]


class PrefixPins:
    """The chunks ChatBraid pinned on one engine, keyed by their whole token prefix."""

    def __init__(self, llm: LLM, max_chunks: int = MAX_PINNED_CHUNKS):
        # Weakly: the module registry holds these pins as long as the engine lives, and a strong reference here
        # would make that forever (every closed or replaced engine kept with its weights and KV pages).
        self._llm = weakref.ref(llm)
        self.max_chunks = max_chunks
        self._chunks: OrderedDict[str, Chunk] = OrderedDict()  # by chunk id, least recently used first
        # By whole-prefix length: a lookup compares the prompt with the few chunks of its length (a list comparison
        # in C), rather than hashing a tuple of the whole prefix on every call.
        self._by_end: dict[int, list[Chunk]] = {}
        self._heads: OrderedDict[Hashable, HeadRenderings] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def llm(self) -> LLM:
        """The engine these chunks are pinned on (EngineDeadError once it was collected)."""
        llm = self._llm()
        if llm is None:
            raise EngineDeadError("the engine these prefixes were pinned on is gone")
        return llm

    def pin(self, prompt: list[int], segments: Sequence[tuple[int, str]]) -> int | None:
        """Makes sure prompt[:end] is pinned for every (end, kind) segment (creating chunks as needed).

        Returns None when every segment was pinned already; else how many prompt tokens were cached before the
        first prefill (the most the call may report as cache_read)."""
        parent, cached_before = None, None
        for end, kind in self._useful(segments):
            chunk = self._lookup(prompt, end)
            if chunk is None:
                if cached_before is None:
                    cached_before = self.llm.num_cached_tokens(prompt)
                try:
                    chunk = self.llm.chunks.add(self._own(prompt, end, parent), after=parent, kind=kind)
                except PinWouldStarveError:  # a running request needs the room for now: unpinned this time
                    return cached_before
                except _REFUSED:
                    self._release_oldest_half()  # make room for next time
                    return cached_before
                chunk = self._store(prompt, end, chunk)
            parent = chunk
        return cached_before

    async def apin(self, prompt: list[int], segments: Sequence[tuple[int, str]]) -> int | None:
        """`pin` for asyncio (the prefills do not block the event loop)."""
        parent, cached_before = None, None
        for end, kind in self._useful(segments):
            chunk = self._lookup(prompt, end)
            if chunk is None:
                if cached_before is None:
                    cached_before = await self.llm.anum_cached_tokens(prompt)
                try:
                    chunk = await self.llm.chunks.aadd(self._own(prompt, end, parent), after=parent, kind=kind)
                except PinWouldStarveError:
                    return cached_before
                except _REFUSED:
                    self._release_oldest_half()
                    return cached_before
                chunk = self._store(prompt, end, chunk)
            parent = chunk
        return cached_before

    def heads(self, key: Hashable, render: Callable[[], HeadRenderings]) -> HeadRenderings:
        """The head renderings stored under `key`, rendering them with `render` the first time."""
        with self._lock:
            heads = self._heads.get(key)
            if heads is not None:
                self._heads.move_to_end(key)
                return heads
        heads = render()
        with self._lock:
            self._heads[key] = heads
            while len(self._heads) > MAX_CACHED_HEADS:
                self._heads.popitem(last=False)
        return heads

    def release_all(self) -> None:
        with self._lock:
            chunks = list(self._chunks.values())
            self._chunks.clear()
            self._by_end.clear()
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
        with self._lock:
            chunk = self._find(prompt, end)
            if chunk is not None and chunk.released:  # released from outside (e.g. llm.chunks.release_all)
                self._forget(chunk)
                chunk = None
            if chunk is not None:
                self._chunks.move_to_end(chunk.id)
        return chunk

    def _store(self, prompt: list[int], end: int, chunk: Chunk) -> Chunk:
        evicted = []
        with self._lock:
            existing = self._find(prompt, end)
            if existing is not None and not existing.released:  # another caller pinned it meanwhile
                evicted.append(chunk)
                chunk = existing
            elif existing is not None:
                self._forget(existing)
            if chunk is not existing:
                self._chunks[chunk.id] = chunk
                self._by_end.setdefault(chunk.num_prefix_tokens, []).append(chunk)
            self._chunks.move_to_end(chunk.id)
            while len(self._chunks) > self.max_chunks:
                evicted.append(self._pop_oldest())
        for old in evicted:
            old.release()
        return chunk

    def _release_oldest_half(self) -> None:
        with self._lock:
            old = [self._pop_oldest() for _ in range((len(self._chunks) + 1) // 2)]
        for chunk in old:
            chunk.release()

    def _find(self, prompt: list[int], end: int) -> Chunk | None:
        """The stored chunk whose whole prefix is prompt[:end] (call under the lock)."""
        same_length = self._by_end.get(end)
        if same_length:
            head = prompt[:end]
            for chunk in same_length:
                if chunk.prefix_token_ids == head:
                    return chunk
        return None

    def _forget(self, chunk: Chunk) -> None:
        """Drops a stored chunk from both indexes (call under the lock)."""
        del self._chunks[chunk.id]
        same_length = self._by_end[chunk.num_prefix_tokens]
        same_length.remove(chunk)
        if not same_length:
            del self._by_end[chunk.num_prefix_tokens]

    def _pop_oldest(self) -> Chunk:
        chunk = next(iter(self._chunks.values()))
        self._forget(chunk)
        return chunk


_registry: weakref.WeakKeyDictionary[Any, PrefixPins] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()


def pins_for(llm: LLM) -> PrefixPins:
    """The pin registry of one engine."""
    with _registry_lock:
        pins = _registry.get(llm)
        if pins is None:
            pins = _registry[llm] = PrefixPins(llm)
        return pins


def drop_pins(llm: LLM) -> None:
    """Releases the chunks pinned on `llm` and forgets its registry entry (the engine is closing)."""
    with _registry_lock:
        pins = _registry.pop(llm, None)
    if pins is not None:
        pins.release_all()
