"""Each model family's own tool-call format: how calls are written in a reply, how the chat template is given the
tools, and the fixed text a forced call keeps around its constrained JSON. Pure functions.

- hermes (Qwen2.5, Qwen3, Hermes, QwQ): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`;
- mistral (Mistral 7B v0.3, Ministral, Nemo): `[TOOL_CALLS] [{"name": ..., "arguments": {...}}]`, or
  `[TOOL_CALLS]name[ARGS]{...}` in later templates;
- llama3 (Llama 3.1, 3.2, 3.3): `{"name": ..., "parameters": {...}}`, maybe after `<|python_tag|>`;
- phi4 (Phi-4-mini): `<|tool_call|>[{"name": ..., "arguments": {...}}]<|/tool_call|>`;
- json (Gemma, SmolLM2, templates without tools): `{"name": ..., "arguments": {...}}`, asked for in the system
  prompt.

The family is recognised from the chat template's text (the markers it renders), so a fine-tune that keeps its
base model's template keeps the format. A marker the tokenizer treats as a special token is dropped from the
streamed text; the parsers therefore also accept the bare JSON that is left.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from braid_langchain.tool_parser import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolCallStream


@dataclass(frozen=True)
class ToolFormat:
    """One family's tool-call format. `open` / `close`: the text around a block of calls (`close` None: the block
    runs to the end of the reply); `list_body`: a block holds a JSON list of calls; `args_key`: the key of the
    arguments in a call; `native`: the chat template renders the tools (else the system prompt describes them)."""

    name: str
    open: str | None = None
    close: str | None = None
    list_body: bool = False
    args_key: str = "arguments"
    native: bool = True
    forced_open: str | None = None
    """The text a forced call starts with (default `open`); templates put a newline or space after the tag."""
    forced_close: str | None = None
    """The text a forced call ends with (default `close`)."""

    def parser(self, *, forced: bool = False, tools: Collection[str] | None = None) -> ToolCallStream:
        """A streaming parser of replies in this format; `forced`: the reply is one constrained call; `tools`: the
        bound tools' names (None: unknown)."""
        if self.open is None or (forced and forced_call_text(self) == ("", "")):
            return ToolCallStream(forced=forced, tools=tools)
        return ToolCallStream(forced=forced, open_tag=self.open, close_tag=self.close, tools=tools)

    def call_json(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, self.args_key: arguments}


HERMES = ToolFormat("hermes", TOOL_CALL_OPEN, TOOL_CALL_CLOSE, forced_open=TOOL_CALL_OPEN + "\n",
                    forced_close="\n" + TOOL_CALL_CLOSE)
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", None, list_body=True, forced_open="[TOOL_CALLS] ")
LLAMA3 = ToolFormat("llama3", "<|python_tag|>", None, args_key="parameters", forced_open="")
PHI4 = ToolFormat("phi4", "<|tool_call|>", "<|/tool_call|>", list_body=True)
GENERIC = ToolFormat("generic", TOOL_CALL_OPEN, TOOL_CALL_CLOSE, forced_open="", forced_close="")
"""A template that renders tools in no known format: calls parsed as Hermes blocks or bare JSON; a forced call is
bare JSON."""
JSON = ToolFormat("json", native=False)
"""Templates that do not render tools (Gemma, SmolLM2): the tool prompt asks for bare JSON calls."""

_MARKERS = (  # (text in the chat template, format); first match wins
    ("<tool_call>", HERMES),
    ("[TOOL_CALLS]", MISTRAL),
    ("<|python_tag|>", LLAMA3),
    ("Environment: ipython", LLAMA3),
    ("<|tool_call|>", PHI4),
    ("<|tool|>", PHI4),
)


def detect_tool_format(chat_template: str | None) -> ToolFormat:
    """The tool format of a model with this chat template. A template that mentions tools in no known format is
    `GENERIC` (its tools are rendered by the template; replies are parsed for `<tool_call>` blocks and bare
    JSON), one that does not mention them gets the JSON system prompt."""
    if not chat_template:
        return JSON
    for marker, fmt in _MARKERS:
        if marker in chat_template:
            return fmt
    return GENERIC if "tools" in chat_template else JSON


def template_tools(fmt: ToolFormat, chat: list[dict[str, Any]], tools: list[dict[str, Any]]
                   ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, template kwargs) that give `tools` to the template as the family expects: `tools=` for most;
    Phi-4-mini's template reads them as JSON text from the system message's `tools` field."""
    if not tools or not fmt.native:
        return chat, {}
    if fmt is not PHI4:
        return chat, {"tools": tools}
    text = json.dumps([t["function"] for t in tools], ensure_ascii=False)
    if chat and chat[0]["role"] == "system":
        return [{**chat[0], "tools": text}, *chat[1:]], {}
    return [{"role": "system", "content": "", "tools": text}, *chat], {}


def history_calls(fmt: ToolFormat) -> bool | Callable[[list[tuple[str, dict[str, Any]]]], str]:
    """How earlier turns' calls reach the template (`messages.to_chat_messages(inline_tool_calls=...)`): in the
    `tool_calls` field (False), as JSON lines in the content (True: the tool prompt's format), or written into
    the content by a function (Phi-4-mini, whose template renders no `tool_calls`)."""
    if fmt is PHI4:
        return _phi4_calls
    return not fmt.native


def _phi4_calls(calls: list[tuple[str, dict[str, Any]]]) -> str:
    body = json.dumps([{"name": name, "arguments": args} for name, args in calls], ensure_ascii=False)
    return f"{PHI4.open}{body}{PHI4.close}"


def history_call_id(fmt: ToolFormat, call_id: str) -> str:
    """The id an earlier turn's call carries in the prompt. Mistral's template accepts only 9 alphanumeric
    characters: other ids map to a stable hash of themselves (stable, so a re-rendered history is the same text and
    its KV is reused)."""
    if fmt is not MISTRAL or (len(call_id) == 9 and call_id.isalnum()):
        return call_id
    return hashlib.sha1(call_id.encode()).hexdigest()[:9]


def forced_call_text(fmt: ToolFormat) -> tuple[str, str]:
    """(begin, end): the fixed text a forced call keeps around its JSON in this format."""
    begin = fmt.forced_open if fmt.forced_open is not None else (fmt.open or "")
    end = fmt.forced_close if fmt.forced_close is not None else (fmt.close or "")
    return begin, end


def forced_call_tag(fmt: ToolFormat, call_schema: dict[str, Any], single_tokens: Collection[str] = ()
                    ) -> dict[str, Any] | None:
    """An xgrammar structural tag for one forced call: the format's fixed text around JSON matching
    `call_schema` (a list of one call for list formats); None for formats without fixed text (plain JSON).

    A tag that is one of `single_tokens` (the tokenizer's added tokens: Qwen's `<tool_call>`, Mistral's
    `[TOOL_CALLS]`) is matched as that token, as the model writes it, not spelled out in ordinary tokens."""
    begin, end = forced_call_text(fmt)
    if not begin and not end:
        return None
    schema = {"type": "array", "items": call_schema, "minItems": 1, "maxItems": 1} if fmt.list_body else call_schema
    content = {"type": "json_schema", "json_schema": schema}
    elements = [*_text_elements(begin, single_tokens), content, *_text_elements(end, single_tokens)]
    return {"type": "structural_tag", "format": {"type": "sequence", "elements": elements}}


def _text_elements(text: str, single_tokens: Collection[str]) -> list[dict[str, Any]]:
    tag = text.strip()
    if not tag or tag not in single_tokens:
        return [{"type": "const_string", "value": text}] if text else []
    before, _, after = text.partition(tag)
    return [*_text_elements(before, ()), {"type": "token", "token": tag}, *_text_elements(after, ())]


def rename_arguments(call_schema: dict[str, Any], args_key: str) -> dict[str, Any]:
    """A forced-call schema (`tools.forced_call_schema`) with `arguments` renamed to `args_key` in each call."""
    if args_key == "arguments":
        return call_schema
    if "anyOf" in call_schema:
        return {**call_schema, "anyOf": [rename_arguments(o, args_key) for o in call_schema["anyOf"]]}
    props = {(args_key if k == "arguments" else k): v for k, v in call_schema["properties"].items()}
    required = [args_key if k == "arguments" else k for k in call_schema.get("required", [])]
    return {**call_schema, "properties": props, "required": required}
