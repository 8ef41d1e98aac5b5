"""A prompt given as token ids that the engine's own tokenizer produced, so the engine need not check each id.

A plain list of ids is checked id by id (an int, in the vocabulary) before it is queued: for a prompt of 1.5k tokens
that is a few hundred microseconds of the caller's thread per request, as much as the rest of ChatBraid's request
building (benchmarks/langchain_overhead.py). Ids that a tokenizer produced are ints by construction, so they get
cheaper checks that run in C: `sum` for their type (a float or a numpy scalar among ints changes the sum's type, a str
makes it fail; the list check then names the bad ids) and `min` and `max` for their range (the model's vocabulary may
be smaller than the tokenizer's).

Even that is ~50 us for 1.5k ids (min + max, measured on a 2-core CPU host), paid again for the same system prompt
and documents on every call. So a prompt may put the ids that many prompts share in a `head` tuple, passed as the
same object each time: a tuple cannot change, so once a head object has been checked (`CheckedHeads`, kept per
engine) only the ids after it are.

The tokenizer is named by the object itself: ids from any other tokenizer object (another engine's) are checked like a
plain list, since another vocabulary's ids may be out of range or mean other tokens.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

MAX_CHECKED_HEADS = 64
"""Most head tuples whose check an engine remembers (least recently used ones are forgotten first)."""


@dataclass(frozen=True, eq=False)
class TokenizedPrompt:
    """Prompt token ids produced by `tokenizer` (an engine's `LLM.tokenizer`), accepted wherever a prompt is: the
    prompt is `head` followed by `token_ids`.

    >>> ids = llm.apply_chat_template([{"role": "user", "content": "Hi"}])
    >>> llm.generate(TokenizedPrompt(ids, llm.tokenizer))
    """

    token_ids: list[int]
    """The ids, as the tokenizer returned them (not copied here; the engine copies them)."""
    tokenizer: Any
    """The tokenizer object that produced them."""
    head: tuple[int, ...] = ()
    """Ids before `token_ids` that many prompts share (a system prompt with its documents): passed as the same tuple
    object, they are range-checked on the first prompt only."""

    def __len__(self) -> int:
        return len(self.head) + len(self.token_ids)

    def ids(self) -> list[int]:
        """The whole prompt, a new list."""
        return [*self.head, *self.token_ids]


class CheckedHeads:
    """The head tuples one engine has found valid (each id an int in [0, vocab_size)), by identity; thread-safe.

    Each is held, so its id() cannot name another object while it is remembered; a forgotten one is checked again."""

    def __init__(self, vocab_size: int, max_heads: int = MAX_CHECKED_HEADS):
        self.vocab_size, self.max_heads = vocab_size, max_heads
        self._heads: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def valid(self, head: tuple[int, ...]) -> bool:
        """Whether every id of `head` is an int in range: remembered for a tuple once it was found so."""
        if type(head) is not tuple:  # a list (or a tuple subclass) may change between prompts: checked every time
            return self._in_range(head)
        key = id(head)
        with self._lock:
            if self._heads.get(key) is head:
                self._heads.move_to_end(key)
                return True
        if not self._in_range(head):
            return False
        with self._lock:
            self._heads[key] = head
            while len(self._heads) > self.max_heads:
                self._heads.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._heads)

    def _in_range(self, ids: Any) -> bool:
        vocab = self.vocab_size
        return all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids)
