"""Engine chunks -> LangChain `ChatGenerationChunk`s. Shared by `_stream` and `_astream`; no engine calls.

Text streams as it becomes final (text that may be a tool call is held back until it is decided); each complete
tool call becomes one `tool_call_chunk`; the last chunk, and only it, carries `usage_metadata`,
`response_metadata` and `chunk_position="last"`.
"""
from __future__ import annotations

import json
import uuid
from typing import Any, Literal, Protocol

from langchain_core.messages import AIMessageChunk
from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGenerationChunk
from langchain_core.utils.json import parse_partial_json

from braid_langchain.tool_parser import ParsedCall, ToolCallStream

ToolMode = Literal["off", "auto", "forced"]
PROVIDER = "braid"


class EngineUsage(Protocol):
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int


class EngineChunk(Protocol):
    """What is read from a `braidinfer.CompletionDelta`."""

    text: str
    finish_reason: str | None
    usage: EngineUsage | None


class ChunkBuilder:
    """Turns one request's engine chunks into LangChain chunks. `tool_mode`: "off" (plain text), "auto" (calls
    parsed from the reply), "forced" (the reply is one constrained JSON call)."""

    def __init__(self, model_name: str, tool_mode: ToolMode = "off"):
        self.model_name = model_name
        self._calls = None if tool_mode == "off" else ToolCallStream(forced=tool_mode == "forced")
        self._num_calls = 0

    def add(self, chunk: EngineChunk) -> list[ChatGenerationChunk]:
        """The LangChain chunks for one engine chunk (possibly none while text is held back)."""
        events: list[str | ParsedCall]
        if self._calls is None:
            events = [chunk.text] if chunk.text else []
        else:
            events = self._calls.feed(chunk.text)
            if chunk.finish_reason is not None:
                events += self._calls.finish()
        messages = [self._message(e) for e in events]
        if chunk.finish_reason is not None:
            last = messages.pop() if messages else AIMessageChunk(content="")
            messages.append(self._finish(last, chunk))
        return [ChatGenerationChunk(message=m) for m in messages]

    def _message(self, event: str | ParsedCall) -> AIMessageChunk:
        if isinstance(event, str):
            return AIMessageChunk(content=event)
        index, self._num_calls = self._num_calls, self._num_calls + 1
        args = json.dumps(event.args, ensure_ascii=False) if event.args is not None else invalid_args(event.raw)
        call = tool_call_chunk(name=event.name, args=args, id=f"call_{uuid.uuid4().hex[:24]}", index=index)
        return AIMessageChunk(content="", tool_call_chunks=[call])

    def _finish(self, message: AIMessageChunk, chunk: EngineChunk) -> AIMessageChunk:
        metadata = {"model_name": self.model_name, "finish_reason": chunk.finish_reason,
                    "model_provider": PROVIDER}
        usage = usage_metadata(chunk.usage) if chunk.usage is not None else None
        return AIMessageChunk(content=message.content, tool_call_chunks=message.tool_call_chunks,
                              usage_metadata=usage, response_metadata=metadata, chunk_position="last")


def usage_metadata(usage: EngineUsage) -> UsageMetadata:
    """Engine token counts as LangChain usage; cache_creation is the part of the prompt prefilled (and cached)."""
    cached = usage.cached_prompt_tokens
    return UsageMetadata(
        input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        input_token_details=InputTokenDetails(cache_read=cached, cache_creation=usage.prompt_tokens - cached))


def invalid_args(raw: str) -> str:
    """The args string of a malformed call. LangChain re-parses streamed args leniently (closing brackets), so
    raw text that would parse to an object is passed as a JSON string and the call stays invalid."""
    try:
        lenient: Any = parse_partial_json(raw)
    except Exception:  # any parse failure keeps the call invalid, which is the point
        return raw
    return json.dumps(raw, ensure_ascii=False) if isinstance(lenient, dict) else raw
