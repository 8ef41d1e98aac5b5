"""What a checkpoint's chat template expects of the conversation, read once per tokenizer: its tool-call format,
its reasoning format, and whether it accepts a system role. Gemma's templates raise on a system role and on any role
but user and model in turn: the system message is folded into the first user turn (as Gemma's own documentation
does), and a later system message and tool results become user turns. Pure apart from the per-tokenizer cache."""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any

from braidinfer.chat_template import fold_system, has_system_role, special_token_strings

from braid_langchain.messages import merge_consecutive
from braid_langchain.reasoning import ReasoningFormat, reasoning_format
from braid_langchain.reasoning import template_kwargs as reasoning_kwargs
from braid_langchain.tool_formats import ToolFormat, detect_tool_format, template_tools

@dataclass(frozen=True)
class ChatFormat:
    """One model's conversation conventions (see the module docstring)."""

    tools: ToolFormat
    reasoning: ReasoningFormat | None
    system_role: bool
    single_tokens: frozenset[str]
    """The tokenizer's added tokens (`<tool_call>`, `[TOOL_CALLS]`, ...): a forced call writes each as its one token,
    as the model does, not spelled out in ordinary tokens."""


_formats: weakref.WeakKeyDictionary[Any, ChatFormat] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def chat_format(tokenizer: Any) -> ChatFormat:
    """The conventions of the model whose tokenizer (with its chat template) this is; cached per tokenizer."""
    with _lock:
        found = _formats.get(tokenizer)
    if found is not None:
        return found
    template = getattr(tokenizer, "chat_template", None)
    template = template if isinstance(template, str) else None
    fmt = ChatFormat(detect_tool_format(template), reasoning_format(tokenizer),
                     system_role=has_system_role(tokenizer),
                     single_tokens=_added_tokens(tokenizer))
    with _lock:
        _formats[tokenizer] = fmt
    return fmt


def _added_tokens(tokenizer: Any) -> frozenset[str]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return frozenset(t.content for t in added.values()) | frozenset(special_token_strings(tokenizer))


def template_inputs(fmt: ChatFormat, chat: list[dict[str, Any]], tools: list[dict[str, Any]],
                    reasoning: bool | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, template kwargs) for the chat template: tools where the family wants them, the reasoning switch,
    and for templates without a system role, system messages as user turns (see `fold_system`)."""
    chat, kwargs = template_tools(fmt.tools, chat, tools)
    if not fmt.system_role:
        chat = merge_consecutive(fold_system([_as_user(m) if m["role"] == "tool" else m for m in chat]))
    return chat, {**kwargs, **(reasoning_kwargs(reasoning) if fmt.reasoning is not None else {})}


def _as_user(result: dict[str, Any]) -> dict[str, Any]:
    name = f" {result['name']}" if result.get("name") else ""
    return {"role": "user", "content": f"Result of the tool call{name}:\n{result['content']}"}
