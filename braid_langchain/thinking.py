"""A reply of a reasoning model in two phases: the thought, then the answer.

Phase 1 generates the thought unconstrained, up to `max_reasoning_tokens` tokens, stopping at `</think>`. If the
model did not close its thought, the engine closes it: phase 2 continues the same request from the prompt plus the
thought plus `</think>\\n\\n` (the prefix cache holds all but the last page of that already, so the continuation
prefills a few tokens), with the request's own constraint (tool call or structured output), which therefore
applies to the answer only. The caller sees one stream of deltas, as if the model had written `</think>` itself,
and one usage: completion tokens of both phases and the closing tokens, the prompt as phase 1 read it.

The request's stop strings apply to the answer only (a thought that mentions one goes on), so a request with stop
strings takes two phases too.

The thought must be open when phase 1 starts: when the template does not open it in the generation prompt
(Qwen3), `<think>\\n` is appended to the prompt first (as the R1-distill templates do).
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, closing
from dataclasses import dataclass
from time import monotonic
from typing import Any

from braidinfer.errors import RequestTimeoutError

from braid_langchain.reasoning import ANSWER_SEPARATOR, ReasoningFormat, prompt_opens_thought


@dataclass(frozen=True)
class ThoughtBudget:
    """Phase 1's limits: `fmt` the reasoning format; `max_tokens` the most thought tokens (None: the request's
    max_tokens)."""

    fmt: ReasoningFormat
    max_tokens: int | None


class _Phases:
    """The bookkeeping shared by the sync and async loops; no engine calls."""

    def __init__(self, budget: ThoughtBudget, tokenizer: Any, prompt: list[int], params: Any):
        self.budget, self.tokenizer, self.prompt, self.params = budget, tokenizer, prompt, params
        limit = params.max_tokens if budget.max_tokens is None else min(budget.max_tokens, params.max_tokens)
        self.first = params.model_copy(update={"max_tokens": limit, "guided": None, "stop": [],
                                               "stop_token_ids": [*params.stop_token_ids, budget.fmt.close_token_id]})
        self.separator = list(tokenizer(ANSWER_SEPARATOR, add_special_tokens=False)["input_ids"])
        self.newline = list(tokenizer("\n", add_special_tokens=False)["input_ids"])
        self.thought: list[int] = []
        self.first_usage: Any = None

    def on_first(self, delta: Any) -> Any | None:
        """Phase 1's delta as the caller sees it (its end becomes an ordinary delta; None when nothing is left)."""
        ids = list(delta.token_ids)
        self.thought += ids
        if delta.finish_reason is None:
            return delta
        self.first_usage = delta.usage
        if self.closed_by_model:
            ids = ids[:-1]
        if self.ends_here(delta):
            if not self.closed_by_model:
                return delta
            return dataclasses.replace(delta, token_ids=ids, finish_reason="length")  # no room left to answer
        return dataclasses.replace(delta, token_ids=ids, finish_reason=None, usage=None) if delta.text or ids else None

    @property
    def closed_by_model(self) -> bool:
        return bool(self.thought) and self.thought[-1] == self.budget.fmt.close_token_id

    def ends_here(self, last: Any) -> bool:
        """Whether the reply ends with phase 1: an error, an abort, the model's own end of text inside its thought,
        max_tokens spent or too few left for the closing text and one answer token, or the model's context reached
        before the thought's budget (phase 2's prompt would not fit)."""
        if last.finish_reason not in ("stop", "length"):
            return True
        if last.finish_reason == "stop":
            return not self.closed_by_model or self._no_room()
        return self._no_room() or last.usage.completion_tokens < self.first.max_tokens

    def _no_room(self) -> bool:
        return len(self._thought()) + len(self._closing().token_ids) >= self.params.max_tokens

    def _thought(self) -> list[int]:
        return self.thought[:-1] if self.closed_by_model else self.thought

    def _closing(self) -> _Delta:
        """The closing text: `</think>` and the separator, after a newline where the engine cuts a thought that does
        not end with one (the chat templates render a thought so when it comes back in the history, and the prefix
        cache then finds this reply's tokens)."""
        fmt, thought = self.budget.fmt, self._thought()
        close = _Delta(text=fmt.close + ANSWER_SEPARATOR, token_ids=[fmt.close_token_id, *self.separator])
        if self.closed_by_model or not thought or self.tokenizer.decode(thought[-1:]).endswith("\n"):
            return close
        return _Delta(text="\n" + close.text, token_ids=self.newline + close.token_ids)

    def closing(self) -> tuple[Any, list[int], Any]:
        """(the delta of the closing text, phase 2's prompt, phase 2's params)."""
        thought, close = self._thought(), self._closing()
        self.num_closing = len(close.token_ids)
        self.num_thought = len(thought)
        remaining = self.params.max_tokens - self.num_thought - self.num_closing  # >= 1: ends_here checked
        return close, self.prompt + thought + close.token_ids, self.params.model_copy(update={"max_tokens": remaining})

    def on_second(self, delta: Any) -> Any:
        if delta.usage is None:
            return delta
        usage = dataclasses.replace(
            delta.usage, prompt_tokens=self.first_usage.prompt_tokens,
            cached_prompt_tokens=self.first_usage.cached_prompt_tokens,
            completion_tokens=self.num_thought + self.num_closing + delta.usage.completion_tokens)
        return dataclasses.replace(delta, usage=usage)


@dataclass
class _Delta:
    """A delta the engine did not produce (the closing text), shaped like `braidinfer.CompletionDelta`."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Any = None
    request_id: str = ""
    logprobs: list[Any] = dataclasses.field(default_factory=list)
    error: BaseException | None = None


def stream_deltas(engine: Any, prompt: list[int], params: Any, budget: ThoughtBudget,
                  timeout: float | None = None) -> Iterator[Any]:
    """The reply's deltas, thought then answer (see the module docstring); `timeout`: seconds for both phases."""
    phases = _Phases(budget, engine.tokenizer, prompt, params)
    if params.guided is not None:  # a constraint that cannot compile fails now, not after the whole thought
        engine.compile_guided(params.guided)
    deadline = None if timeout is None else monotonic() + timeout  # for the whole reply, both phases
    last = None
    with closing(engine.stream_deltas(prompt, phases.first, timeout=timeout)) as first:  # an early stop cancels
        for delta in first:
            last = delta
            if (out := phases.on_first(delta)) is not None:
                yield out
    if last is None or phases.ends_here(last):
        return
    close, prompt2, params2 = phases.closing()
    yield close
    remaining = None if deadline is None else max(0.0, deadline - monotonic())
    try:
        with closing(engine.stream_deltas(prompt2, params2, timeout=remaining)) as second:
            for delta in second:
                yield phases.on_second(delta)
    except RequestTimeoutError:  # its message gives the seconds left for phase 2: say the whole call's
        raise RequestTimeoutError.after(timeout) from None


async def astream_deltas(engine: Any, prompt: list[int], params: Any, budget: ThoughtBudget) -> AsyncIterator[Any]:
    """`stream_deltas` on the event loop."""
    phases = _Phases(budget, engine.tokenizer, prompt, params)
    if params.guided is not None:
        await asyncio.to_thread(engine.compile_guided, params.guided)
    last = None
    async with aclosing(engine.astream_deltas(prompt, phases.first)) as first:
        async for delta in first:
            last = delta
            if (out := phases.on_first(delta)) is not None:
                yield out
    if last is None or phases.ends_here(last):
        return
    close, prompt2, params2 = phases.closing()
    yield close
    async with aclosing(engine.astream_deltas(prompt2, params2)) as second:
        async for delta in second:
            yield phases.on_second(delta)


def plan_thought(tokenizer: Any, fmt: ReasoningFormat | None, prompt: list[int], reasoning: bool | None,
                 max_reasoning_tokens: int | None, constrained: bool
                 ) -> tuple[list[int], bool, ThoughtBudget | None]:
    """(prompt, whether it opens the thought, phase 1's budget or None for one phase) of a request.

    `reasoning=False` with a template that opens the thought anyway (R1-distill) closes it empty, as Qwen3's
    template does for `enable_thinking=False`. Two phases are needed for a thinking budget, and for a constrained
    reply or one with stop strings (`constrained`), whose constraint and stop strings must not apply to the
    thought."""
    if fmt is None:
        return prompt, False, None
    opened = prompt_opens_thought(tokenizer, prompt, fmt)
    if reasoning is False:
        if opened:
            prompt = prompt + _ids(tokenizer, "\n" + fmt.close + ANSWER_SEPARATOR)
        return prompt, False, None
    if max_reasoning_tokens is None and not constrained:
        return prompt, opened, None
    if not opened:
        prompt = prompt + _ids(tokenizer, fmt.open + "\n")
    return prompt, True, ThoughtBudget(fmt, max_reasoning_tokens)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
