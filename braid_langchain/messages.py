"""LangChain messages -> the list of dicts a Hugging Face chat template renders.

Pure functions, shared by the sync and async paths. The output follows the chat-template convention: roles
"system" / "user" / "assistant" / "tool"; an assistant's tool calls in its `tool_calls` field as
`{"type": "function", "id", "function": {"name", "arguments": dict}}`; a tool result as role "tool" with
`tool_call_id` and `name`. For a template that knows nothing of tools, `inline_tool_calls=True` writes an
assistant's calls into its content in the JSON format the tool prompt asks for (see `tools.format_tool_call`), and
a function `inline_tool_calls([(name, args), ...]) -> text` writes them in a family's own format.
An assistant's reasoning (`additional_kwargs["reasoning_content"]`) goes in its `reasoning_content` field, which the
templates of reasoning models (Qwen3) render or drop by their own rules; other templates ignore the field.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from braid_langchain.tools import format_tool_call

# Content blocks that carry no text for the prompt: tool calls travel in `tool_calls`, reasoning is not history.
_SKIPPED_BLOCKS = frozenset({"tool_use", "tool_call", "tool_call_chunk", "reasoning", "thinking"})
# Roles whose consecutive messages are joined into one (tool results stay one message per call).
_MERGED_ROLES = frozenset({"system", "user", "assistant"})


def to_chat_messages(messages: Sequence[BaseMessage], *, inline_tool_calls: bool | Callable[..., str] = False,
                     system_extras: Sequence[str] = (), call_id: Callable[[str], str] | None = None
                     ) -> list[dict[str, Any]]:
    """The chat-template dicts of `messages`, consecutive same-role messages merged.

    `system_extras` (tool instructions, rendered documents) are appended, in order, to the leading system message,
    which is created when the conversation has none; keeping them there makes them part of the shared prefix.
    `call_id` maps tool call ids to the ids the template accepts (see `tool_formats.history_call_id`).
    """
    converted = [message_to_dict(m, inline_tool_calls=inline_tool_calls, call_id=call_id) for m in messages]
    return add_to_system(merge_consecutive(converted), system_extras)


def message_to_dict(message: BaseMessage, *, inline_tool_calls: bool | Callable[..., str] = False,
                    call_id: Callable[[str], str] | None = None) -> dict[str, Any]:
    """One LangChain message as a chat-template dict."""
    text = content_text(message.content)
    call_id = call_id or _same
    if isinstance(message, SystemMessage):
        return {"role": "system", "content": text}
    if isinstance(message, HumanMessage):
        return {"role": "user", "content": text}
    if isinstance(message, AIMessage):
        out = _assistant_dict(message, text, inline_tool_calls, call_id)
        thought = message.additional_kwargs.get("reasoning_content")
        return out | ({"reasoning_content": thought} if isinstance(thought, str) and thought else {})
    if isinstance(message, ToolMessage):
        out = {"role": "tool", "content": text, "tool_call_id": call_id(message.tool_call_id)}
        return out | ({"name": message.name} if message.name else {})
    if isinstance(message, FunctionMessage):
        return {"role": "tool", "content": text, "name": message.name}
    if isinstance(message, ChatMessage):
        return {"role": message.role, "content": text}
    raise ValueError(f"ChatBraid cannot convert a message of type {type(message).__name__}")


def _same(call_id: str) -> str:
    return call_id


def _assistant_dict(message: AIMessage, text: str, inline_tool_calls: bool | Callable[..., str],
                    call_id: Callable[[str], str]) -> dict[str, Any]:
    if not message.tool_calls:
        return {"role": "assistant", "content": text}
    if callable(inline_tool_calls):
        calls = inline_tool_calls([(tc["name"], tc["args"]) for tc in message.tool_calls])
        return {"role": "assistant", "content": text + calls}
    if inline_tool_calls:
        calls = "\n".join(format_tool_call(tc["name"], tc["args"]) for tc in message.tool_calls)
        return {"role": "assistant", "content": f"{text}\n{calls}" if text else calls}
    tool_calls = [{"type": "function", "id": call_id(tc["id"]) if tc["id"] else tc["id"],
                   "function": {"name": tc["name"], "arguments": tc["args"]}} for tc in message.tool_calls]
    return {"role": "assistant", "content": text, "tool_calls": tool_calls}


def content_text(content: str | list[Any]) -> str:
    """The text of a message's content: a string, or the text blocks of a content list joined in order."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif block.get("type") not in _SKIPPED_BLOCKS:
            raise ValueError(f"ChatBraid accepts text content only; got a {block.get('type')!r} content block")
    return "".join(parts)


def merge_consecutive(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Joins runs of system, user or assistant messages (many templates require alternating roles)."""
    merged: list[dict[str, Any]] = []
    for message in messages:
        prev = merged[-1] if merged else None
        if prev is not None and prev["role"] == message["role"] and message["role"] in _MERGED_ROLES:
            merged[-1] = _join(prev, message)
        else:
            merged.append(dict(message))
    return merged


def _join(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = {**a, "content": "\n\n".join(c for c in (a["content"], b["content"]) if c)}
    tool_calls = a.get("tool_calls", []) + b.get("tool_calls", [])
    return out | ({"tool_calls": tool_calls} if tool_calls else {})


def add_to_system(messages: list[dict[str, Any]], extras: Sequence[str]) -> list[dict[str, Any]]:
    """Appends `extras` to the leading system message (creating one first if needed)."""
    extras = [e for e in extras if e]
    if not extras:
        return messages
    if messages and messages[0]["role"] == "system":
        head, rest = messages[0], messages[1:]
    else:
        head, rest = {"role": "system", "content": ""}, messages
    content = "\n\n".join([head["content"], *extras] if head["content"] else extras)
    return [{**head, "content": content}, *rest]
