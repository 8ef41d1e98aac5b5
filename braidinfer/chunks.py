"""Chunk handles: segments of a prompt (system prompt, document, conversation turn) computed once and pinned.

A chunk is the token prefix `parent's tokens + its own tokens`. Adding it prefills that prefix through the normal
request path (so it reuses whatever is cached) and then pins the full KV pages of the prefix: pinned pages are never
evicted, so every later prompt that starts with the chunk's tokens reads them from the cache. Reuse stays exact (same
tokens at the same positions); a prefix's last partial page is not pinned and is recomputed at use (fewer than
`page_size` tokens). `release()` unpins; the pages stay cached until evicted.

Composed prompts (opt-in, approximate): `add(doc, independent=True)` computes a segment on its own at positions
0.. and keeps all of its KV outside the prefix cache. A prompt may then list independent chunks in any order
(`chunks=[system, doc_b, doc_a]`): each chunk's keys are rotated to its position in the prompt and copied in, and
only the text after them is computed. Each chunk attends only to itself, so the result differs from computing the
whole prompt (later tokens do attend to all chunks); the KV of a composed request is never cached. The quality cost
is measured by `benchmarks/prefix_reuse.py rag`.

    >>> system = llm.chunks.add("You are a terse assistant.", kind="system")
    >>> doc = llm.chunks.add(document_text, after=system, kind="document")
    >>> llm.generate("Question: ...", chunks=[system, doc])
"""
from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from braidinfer.errors import EngineDeadError, InvalidRequestError
from braidinfer.sequence import ComposedSegment

if TYPE_CHECKING:
    from braidinfer.client import EngineClient

ChunkKind = Literal["system", "document", "turn"]
_KINDS = ("system", "document", "turn")


class Chunk:
    """A pinned prompt segment. `token_ids` are its own tokens; `prefix_token_ids` include every ancestor's."""

    def __init__(self, store: ChunkStore, chunk_id: str, kind: ChunkKind, token_ids: list[int],
                 parent: Chunk | None, pages: list[int], independent: bool = False):
        self._store = store
        self.id = chunk_id
        self.kind = kind
        self.token_ids = token_ids
        self.parent = parent
        self.prefix_token_ids: list[int] = (parent.prefix_token_ids if parent else []) + token_ids
        self.pages = tuple(pages)
        self.independent = independent
        self.released = False

    @property
    def num_tokens(self) -> int:
        """The chunk's own tokens (without its parent's)."""
        return len(self.token_ids)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens from the start of the prompt to the end of this chunk."""
        return len(self.prefix_token_ids)

    def chain(self) -> list[Chunk]:
        """This chunk's ancestors and itself, root first."""
        node, out = self, []
        while node is not None:
            out.append(node)
            node = node.parent
        return out[::-1]

    def release(self) -> None:
        """Unpins the chunk's pages (idempotent). They stay in the prefix cache until the pool needs them."""
        self._store.release(self)

    def __enter__(self) -> Chunk:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self.released else f"{len(self.pages)} pinned pages"
        return f"Chunk({self.id!r}, kind={self.kind!r}, {self.num_tokens} tokens, {state})"


class ChunkStore:
    """`llm.chunks`: adds, lists and releases the chunks of one LLM. Thread-safe."""

    def __init__(self, client: EngineClient, render: Callable[..., list[int]]):
        """`client`: the engine's client (prefills and pins); `render`: the chat template (messages -> token ids)."""
        self._client, self._render_template = client, render
        self._chunks: dict[str, Chunk] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._closed = False

    def add(self, content: str | list[int], *, after: Chunk | None = None, kind: ChunkKind = "document",
            independent: bool = False) -> Chunk:
        """Prefills `content` after `after` (its parent chunk, or None for the start of a prompt) and pins it.

        A string is tokenized with the tokenizer's leading special tokens (e.g. BOS) only when it starts a prompt
        (an independent chunk gets them only if kind="system"). `independent=True`: computed on its own at position
        0, for composed prompts (see the module docs); it has no parent. Raises InvalidRequestError for empty
        content, a released or foreign parent, or a chunk that would pin more of the KV pool than the engine allows
        (`EngineConfig.max_pinned_fraction`); EngineDeadError when the LLM is closed, also while the chunk is added.
        """
        own, prefix = self._prepare(content, after, kind, independent)
        chunk_id = self._new_id()
        pages = self._client.prefill_and_pin(prefix, chunk_id, private=independent)
        return self._register(chunk_id, kind, own, after, pages, independent)

    async def aadd(self, content: str | list[int], *, after: Chunk | None = None,
                   kind: ChunkKind = "document", independent: bool = False) -> Chunk:
        """`add` for asyncio: waits for the prefill without blocking the event loop."""
        own, prefix = self._prepare(content, after, kind, independent)
        chunk_id = self._new_id()
        pages = await self._client.aprefill_and_pin(prefix, chunk_id, private=independent)
        return self._register(chunk_id, kind, own, after, pages, independent)

    def add_messages(self, messages: list[dict[str, Any]], *, after: Chunk | None = None,
                     kind: ChunkKind = "system", **template_kwargs: Any) -> Chunk:
        """A chunk holding `messages` rendered by the chat template (no generation prompt), e.g. the system
        message of every conversation. With `after`, `messages` is the whole conversation so far: the parent must
        render as its start, and the chunk holds the rest. Use the chunk with `llm.chat(..., chunks=[chunk])`."""
        return self.add(self._render(messages, after, template_kwargs), after=after, kind=kind)

    def release(self, chunk: Chunk) -> None:
        """Unpins `chunk` (idempotent); children keep their own pins."""
        self._check_owned(chunk, "chunk")
        with self._lock:
            if chunk.released or self._chunks.get(chunk.id) is not chunk:
                return
            chunk.released = True
            del self._chunks[chunk.id]
        self._client.unpin(chunk.id)

    def release_all(self) -> None:
        """Unpins every chunk of this LLM."""
        for chunk in list(self):
            chunk.release()

    def close(self) -> None:
        """Releases every chunk and refuses new ones (the LLM is closing): an `add` whose prefill was still
        running raises EngineDeadError instead of returning a handle to pages that are about to go."""
        with self._lock:
            self._closed = True
        self.release_all()

    def get(self, chunk_id: str) -> Chunk:
        try:
            return self._chunks[chunk_id]
        except KeyError:
            raise InvalidRequestError(f"no chunk {chunk_id!r} (released or never added)") from None

    def __iter__(self) -> Iterator[Chunk]:
        with self._lock:
            return iter(list(self._chunks.values()))

    def __len__(self) -> int:
        return len(self._chunks)

    # --- internals ---------------------------------------------------------------------------------------------
    def resolve(self, chunks: Chunk | Sequence[Chunk] | None) -> tuple[list[int], list[ComposedSegment]]:
        """What a request's `chunks` argument stands for (validated), in plain values for the engine: the token
        prefix, and for a composed prompt where each independent chunk's KV goes (else [])."""
        if chunks is None:
            return [], []
        chain = [chunks] if isinstance(chunks, Chunk) else list(chunks)
        if not chain:
            return [], []
        for chunk in chain:
            self._check_owned(chunk, "chunks")
        if any(c.independent for c in chain):
            return self._composition(chain)
        for i, chunk in enumerate(chain[1:], 1):
            if chunk.parent is not chain[i - 1]:
                raise InvalidRequestError(
                    f"chunks must form a chain: {chunk.id!r} does not follow {chain[i - 1].id!r}; pass the chunks "
                    "in prompt order, or only the last one")
        if chain[0].parent is not None and len(chain) > 1:
            raise InvalidRequestError(f"chunks must start at the start of the prompt: {chain[0].id!r} follows "
                                      f"{chain[0].parent.id!r}; pass the whole chain, or only the last chunk")
        self._check_usable(chain[-1], "chunks")  # it pins the whole prefix, ancestors' pages included
        return list(chain[-1].prefix_token_ids), []

    def _composition(self, chain: list[Chunk]) -> tuple[list[int], list[ComposedSegment]]:
        dependent = [c.id for c in chain if not c.independent]
        if dependent:
            raise InvalidRequestError(f"a composed prompt takes only independent chunks; {dependent} are not "
                                      "(add them with independent=True, or use a chain of ordinary chunks)")
        prefix, compose = [], []
        for chunk in chain:
            self._check_usable(chunk, "chunks")
            compose.append(ComposedSegment(len(prefix), chunk.id, chunk.num_tokens))
            prefix += chunk.token_ids
        return prefix, compose

    def _prepare(self, content: str | list[int], after: Chunk | None, kind: str, independent: bool = False
                 ) -> tuple[list[int], list[int]]:
        if kind not in _KINDS:
            raise InvalidRequestError(f"kind must be one of {', '.join(_KINDS)}; got {kind!r}")
        if independent and after is not None:
            raise InvalidRequestError("an independent chunk has no parent: it is computed on its own at position 0")
        if after is not None:
            self._check_usable(after, "after")
        bos = kind == "system" if independent else after is None
        own = self._client.engine.requests.tokenize(content, add_special_tokens=bos)
        prefix = (after.prefix_token_ids if after else []) + own
        return own, prefix

    def _render(self, messages: list[dict[str, Any]], after: Chunk | None, template_kwargs: dict[str, Any]
                ) -> list[int]:
        template_kwargs.setdefault("add_generation_prompt", False)
        ids = self._render_template(messages, **template_kwargs)
        if after is None:
            return ids
        self._check_usable(after, "after")
        head = after.prefix_token_ids
        if ids[: len(head)] != head or len(ids) == len(head):
            raise InvalidRequestError(
                f"the rendered messages do not extend chunk {after.id!r}: its {len(head)} tokens must be a strict "
                "prefix of the conversation rendered by the chat template")
        return ids[len(head):]

    def _new_id(self) -> str:
        return f"chunk-{next(self._ids)}"  # itertools.count: atomic under the GIL

    def _register(self, chunk_id: str, kind: ChunkKind, own: list[int], after: Chunk | None, pages: list[int],
                  independent: bool = False) -> Chunk:
        with self._lock:
            if not self._closed:
                chunk = Chunk(self, chunk_id, kind, own, after, pages, independent)
                self._chunks[chunk.id] = chunk
                return chunk
        self._client.unpin(chunk_id)  # a no-op once the engine is gone
        raise EngineDeadError(f"the LLM was closed while chunk {chunk_id!r} was being added")

    def _check_usable(self, chunk: Any, arg: str) -> None:
        self._check_owned(chunk, arg)
        if chunk.released:
            raise InvalidRequestError(f"{arg}: chunk {chunk.id!r} was released")

    def _check_owned(self, chunk: Any, arg: str) -> None:
        if not isinstance(chunk, Chunk):
            raise InvalidRequestError(f"{arg} must be Chunk handles from llm.chunks.add, got {type(chunk).__name__}")
        if chunk._store is not self:
            raise InvalidRequestError(f"{arg}: chunk {chunk.id!r} belongs to another LLM")
