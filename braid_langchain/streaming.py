"""Engine completion deltas -> LangChain `ChatGenerationChunk`s. Shared by `_stream` and `_astream`; no engine calls.

Text streams as it becomes final (text that may be a tool call is held back until it is decided); each complete
tool call becomes one `tool_call_chunk`; the last chunk, and only it, carries `usage_metadata`,
`response_metadata` and `chunk_position="last"`.

`finish_reason` follows OpenAI: "tool_calls" when the turn ended with a call, "length" when max_tokens (or the
context) cut the reply, "stop" otherwise. A malformed call (a call cut by max_tokens included, and a reply that
holds no call where tool_choice demanded one) becomes an invalid tool call whose `error` says why and whose `args`
are the text the model wrote. LangChain's own merging of streamed chunks drops that `error` and decides validity
by parsing `args` leniently (an unclosed `{"city": "Par` would become a valid call), so a streamed invalid call
carries text that parses as an object JSON-quoted (`invalid_args`), and `ReplyBuilder.errors` keeps the reason and
the text for the non-streaming result (see `with_errors`).

A call that wants only the whole reply and has no callbacks to feed (`invoke` without handlers) uses
`collect`/`collected` instead of `add`: the same reply as one chunk, without a LangChain object per delta.
"""
from __future__ import annotations

import json
import uuid
from typing import Any, Literal, NamedTuple, Protocol

from langchain_core.language_models.chat_models import generate_from_stream
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.messages.ai import InputTokenDetails, OutputTokenDetails, UsageMetadata
from langchain_core.messages.tool import ToolCallChunk, tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.utils.json import parse_partial_json

from braid_langchain.reasoning import ThoughtSplitter
from braid_langchain.strict_tools import Validators, checked
from braid_langchain.tool_parser import ParsedCall, ToolCallStream

ToolMode = Literal["off", "auto", "forced"]
PROVIDER = "braid"


class EngineUsage(Protocol):
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int


class EngineDelta(Protocol):
    """What is read from one streamed piece of an engine completion (`braidinfer.CompletionDelta`)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: EngineUsage | None


class Thought(str):
    """A piece of the reply's reasoning (`<think>` text), which goes to `additional_kwargs["reasoning_content"]`."""


class CallError(NamedTuple):
    """Why a tool call is invalid, and the text the model wrote for it."""

    reason: str
    raw: str


class ReplyBuilder:
    """Turns one request's engine deltas into LangChain chunks. `tool_mode`: "off" (plain text), "auto" (calls
    parsed from the reply), "forced" (the reply is one constrained JSON call)."""

    def __init__(self, model_name: str, tool_mode: ToolMode = "off", *, max_calls: int | None = None,
                 calls: ToolCallStream | None = None, validators: Validators | None = None):
        self.model_name = model_name
        # `calls`: a parser of the model's own call format (default: Hermes blocks and bare JSON).
        self._calls = None if tool_mode == "off" else calls or ToolCallStream(forced=tool_mode == "forced")
        self._num_calls = 0
        self.max_calls = max_calls
        """Most tool calls kept from the reply (parallel_tool_calls=False: 1); later ones are dropped."""
        self._validators = validators  # strict=True: calls whose arguments do not match their schema are invalid
        self.errors: dict[str, CallError] = {}
        """Call id -> why the call is invalid and its text, for every invalid call so far."""
        self.caching = True
        """Whether the engine keeps computed prompt tokens (prefix caching); when not, cache_creation is 0."""
        self.max_cache_read: int | None = None
        """Most prompt tokens that were in the cache before this call began, when the call itself computed some
        of the prompt before its request ran (pinning prefills); the engine counts those as read from the cache."""
        self._texts: list[str] = []  # what `collect` saw
        self._call_chunks: list[ToolCallChunk] = []
        self._last: EngineDelta | None = None
        self.thoughts: ThoughtSplitter | None = None
        """Splits a reasoning model's thought from its answer (None: the reply is all answer)."""
        self._thought_texts: list[str] = []

    def add(self, chunk: EngineDelta) -> list[ChatGenerationChunk]:
        """The LangChain chunks for one engine chunk (possibly none while text is held back)."""
        events, cut = self._events(chunk)
        messages = [m for m in (self._message(e, cut) for e in events) if m is not None]
        if chunk.finish_reason is not None:
            last = messages.pop() if messages else AIMessageChunk(content="")
            messages.append(self._finish(last, chunk))
        return [ChatGenerationChunk(message=m) for m in messages]

    def collect(self, chunk: EngineDelta) -> None:
        """`add` for a caller that wants only the whole reply (`collected`): no LangChain object per delta."""
        events, cut = self._events(chunk)
        for event in events:
            if isinstance(event, Thought):
                self._thought_texts.append(event)
            elif isinstance(event, str):
                self._texts.append(event)
            elif (call := self._call(event, cut)) is not None:
                self._call_chunks.append(call)
        if chunk.finish_reason is not None:
            self._last = chunk

    def collected(self) -> ChatGenerationChunk:
        """The reply `collect` saw, as one chunk: equal to merging the chunks `add` would have returned."""
        message = AIMessageChunk(content="".join(self._texts), tool_call_chunks=self._call_chunks,
                                 additional_kwargs=_reasoning_kwargs("".join(self._thought_texts)))
        if self._last is None:  # the stream ended without a finish (it cannot, but keep the merge's shape)
            return ChatGenerationChunk(message=message)
        return ChatGenerationChunk(message=self._finish(message, self._last))

    def result(self) -> ChatResult:
        """What LangChain's `generate_from_stream` makes of `collected()`, with the invalid calls' reasons put back
        (`with_errors`). A finished reply without tool calls is built directly as its one message: merging and
        converting chunks would build four."""
        if self._call_chunks or self._last is None:
            result = generate_from_stream(iter([self.collected()]))
            result.generations[0].message = with_errors(result.generations[0].message, self.errors)
            return result
        metadata, usage = self._ending(self._last)
        message = AIMessage(content="".join(self._texts), additional_kwargs=_reasoning_kwargs("".join(
            self._thought_texts)), usage_metadata=usage, response_metadata=metadata)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _events(self, chunk: EngineDelta) -> tuple[list[str | ParsedCall], bool]:
        """Text and parsed calls that became final with this engine chunk, and whether max_tokens cut the reply."""
        events: list[str | ParsedCall]
        text, thought = chunk.text, ""
        if self.thoughts is not None:
            thought, text = self.thoughts.feed(text, chunk.token_ids)
            if chunk.finish_reason is not None:
                more_thought, more_text = self.thoughts.finish()
                thought, text = thought + more_thought, text + more_text
        if self._calls is None:
            events = [text] if text else []
        else:
            events = self._calls.feed(text)
            if chunk.finish_reason is not None:
                events += self._calls.finish()
        return ([Thought(thought)] if thought else []) + events, chunk.finish_reason == "length"

    def _message(self, event: str | ParsedCall, cut: bool) -> AIMessageChunk | None:
        if isinstance(event, Thought):
            return AIMessageChunk(content="", additional_kwargs=_reasoning_kwargs(event))
        if isinstance(event, str):
            return AIMessageChunk(content=event)
        call = self._call(event, cut)
        return None if call is None else AIMessageChunk(content="", tool_call_chunks=[call])

    def _call(self, event: ParsedCall, cut: bool) -> ToolCallChunk | None:
        if self.max_calls is not None and self._num_calls >= self.max_calls:
            return None
        index, self._num_calls = self._num_calls, self._num_calls + 1
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        complete = event.args is not None
        if complete and self._validators:
            event = checked(event, self._validators)
        if event.args is not None:
            args = json.dumps(event.args, ensure_ascii=False)
        else:  # a complete call that fails its schema was not cut, whatever ended the reply after it
            args = invalid_args(event.raw)
            self.errors[call_id] = CallError(event.error if complete else self._reason(event, cut), event.raw)
        return tool_call_chunk(name=event.name, args=args, id=call_id, index=index)

    def _reason(self, event: ParsedCall, cut: bool) -> str:
        """Why `event`, an invalid call, is invalid; `cut`: max_tokens ended the reply."""
        error = event.error or "malformed tool call"
        if not cut:
            return error
        if event.raw.strip():
            return f"the reply was cut by max_tokens (finish_reason 'length') inside this call: {error}"
        hint = ", or bound the thought with max_reasoning_tokens" if self.thoughts is not None else ""
        return f"{error} (finish_reason 'length'; raise max_tokens{hint})"  # e.g. the thought used them up

    def _finish(self, message: AIMessageChunk, chunk: EngineDelta) -> AIMessageChunk:
        metadata, usage = self._ending(chunk)
        return AIMessageChunk(content=message.content, tool_call_chunks=message.tool_call_chunks,
                              additional_kwargs=message.additional_kwargs, usage_metadata=usage,
                              response_metadata=metadata, chunk_position="last")

    def _ending(self, chunk: EngineDelta) -> tuple[dict[str, Any], UsageMetadata | None]:
        """The response metadata and usage of the reply that `chunk` (the engine's last) ends."""
        reason = chunk.finish_reason
        if reason == "stop" and self._num_calls > len(self.errors):  # a valid call ended the turn
            reason = "tool_calls"
        metadata = {"model_name": self.model_name, "finish_reason": reason, "model_provider": PROVIDER}
        usage = usage_metadata(chunk.usage, self.max_cache_read, self.caching) if chunk.usage is not None else None
        if usage is not None and self.thoughts is not None:
            usage["output_token_details"] = OutputTokenDetails(reasoning=self.thoughts.num_tokens)
        return metadata, usage


def _reasoning_kwargs(thought: str) -> dict[str, Any]:
    # Where ChatOllama and ChatDeepSeek put it; langchain-core reads it into v1 "reasoning" content blocks.
    return {"reasoning_content": str(thought)} if thought else {}  # a plain str: chunks merge by type


def with_errors(message: Any, errors: dict[str, CallError]) -> Any:
    """`message` (an AIMessage) with each invalid tool call's `error` filled in, and its `args` set back to the text
    the model wrote, from `errors` (call id -> why and that text)."""
    if not errors or not message.invalid_tool_calls:
        return message
    invalid = [_with_error(tc, errors.get(tc.get("id") or "")) for tc in message.invalid_tool_calls]
    return message.model_copy(update={"invalid_tool_calls": invalid})


def _with_error(call: Any, error: CallError | None) -> Any:
    return call if error is None else {**call, "args": error.raw, "error": call.get("error") or error.reason}


def usage_metadata(usage: EngineUsage, max_cache_read: int | None = None, caching: bool = True) -> UsageMetadata:
    """Engine token counts as LangChain usage. cache_read: prompt tokens computed before this call began;
    cache_creation: the rest of the prompt, computed by this call and kept in the prefix cache (0 when the engine
    runs without one). `max_cache_read`: see `ReplyBuilder.max_cache_read`."""
    cached = usage.cached_prompt_tokens if max_cache_read is None else min(usage.cached_prompt_tokens, max_cache_read)
    created = usage.prompt_tokens - cached if caching else 0
    return UsageMetadata(
        input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        input_token_details=InputTokenDetails(cache_read=cached, cache_creation=created))


def invalid_args(raw: str) -> str:
    """The args string of a malformed call in a streamed chunk. LangChain re-parses streamed args leniently
    (closing brackets) and reads empty args as `{}`, so raw text that is empty or would parse to an object is
    passed as a JSON string and the call stays invalid (`with_errors` puts the raw text back)."""
    try:
        lenient: Any = parse_partial_json(raw) if raw else {}  # LangChain's own reading (AIMessageChunk)
    except Exception:  # any parse failure keeps the call invalid, which is the point
        return raw
    return json.dumps(raw, ensure_ascii=False) if isinstance(lenient, dict) else raw
