"""A prompt given as token ids that the engine's own tokenizer produced, so the engine need not check each id.

A plain list of ids is checked id by id (an int, in the vocabulary) before it is queued: for a prompt of 1.5k tokens
that is a few hundred microseconds of the caller's thread per request, as much as the rest of ChatBraid's request
building (benchmarks/langchain_overhead.py). Ids that a tokenizer produced are ints by construction; only their range
is checked (the model's vocabulary may be smaller than the tokenizer's), with `min` and `max`, which run in C.

The tokenizer is named by the object itself: ids from any other tokenizer object (another engine's) are checked like a
plain list, since another vocabulary's ids may be out of range or mean other tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, eq=False)
class TokenizedPrompt:
    """Prompt token ids produced by `tokenizer` (an engine's `LLM.tokenizer`), accepted wherever a prompt is.

    >>> ids = llm.apply_chat_template([{"role": "user", "content": "Hi"}])
    >>> llm.generate(TokenizedPrompt(ids, llm.tokenizer))
    """

    token_ids: list[int]
    """The ids, as the tokenizer returned them (not copied here; the engine copies them)."""
    tokenizer: Any
    """The tokenizer object that produced them."""

    def __len__(self) -> int:
        return len(self.token_ids)
