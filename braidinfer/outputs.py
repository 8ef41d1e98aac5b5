"""What callers get back: streamed deltas while a request runs, and the finished output."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Usage:
    """Token counts of one request. cached_prompt_tokens of the prompt were served from the prefix cache."""

    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class CompletionDelta:
    """One step's news for one request (a streamed delta): the text that became final and the tokens sampled.

    The last delta of a request has finish_reason ("stop", "length", "abort" or "error") and usage set.
    """

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: list[Any] = field(default_factory=list)
    error: BaseException | None = None


@dataclass
class RequestOutput:
    """A finished request."""

    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list[Any] = field(default_factory=list)
