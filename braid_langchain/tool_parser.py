"""Finds tool calls in a model's reply, incrementally, so text can stream while calls are held back. Pure.

Recognised forms (one reply may hold several calls):
- Qwen3 / Hermes style blocks anywhere in the reply: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
- a reply that is only JSON: one object `{"name": ..., "arguments": {...}}`, a list of them, or one per line
  (`"parameters"` is accepted for `"arguments"`, as is the OpenAI `{"function": {...}}` wrapping, and
  arguments given as a JSON string).
Malformed calls come out as `ParsedCall`s with `args=None` and an `error`; parsing never raises.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r'"name"\s*:\s*"([^"]+)"')


@dataclass(frozen=True)
class ParsedCall:
    """One call as the model wrote it. `args` is None when the call is malformed; `error` then says why."""

    name: str | None
    args: dict[str, Any] | None
    raw: str
    error: str | None = None


Event = str | ParsedCall  # a piece of reply text, or a complete call


def parse_tool_calls(text: str, *, forced: bool = False) -> tuple[str, list[ParsedCall]]:
    """A finished reply split into its text (calls removed, whitespace trimmed) and its calls, in order."""
    stream = ToolCallStream(forced=forced)
    events = stream.feed(text) + stream.finish()
    return "".join(e for e in events if isinstance(e, str)), [e for e in events if isinstance(e, ParsedCall)]


class ToolCallStream:
    """Feed reply text as it arrives; get back text that is certainly not part of a call, and each call once
    it is complete. `forced`: the whole reply is one constrained JSON call (guided decoding).

    States: "start" (only whitespace so far: a leading `{` or `[` means a JSON reply), "text",
    "call" (inside `<tool_call>`), "json" (a JSON reply, parsed at the end).
    """

    def __init__(self, *, forced: bool = False):
        self._state = "json" if forced else "start"
        self._forced = forced
        self._buf = ""

    def feed(self, delta: str) -> list[Event]:
        self._buf += delta
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[Event]:
        """Everything still held back, at the end of the reply."""
        buf, state, self._buf = self._buf, self._state, ""
        if state == "call":
            return [parse_call_block(buf, TOOL_CALL_OPEN + buf)]
        if state == "json":
            calls = parse_json_calls(buf)
            if calls is not None:
                return calls
            if self._forced:
                return [ParsedCall(_guess_name(buf), None, buf, "the reply is not a complete JSON tool call")]
            return [buf.strip()] if buf.strip() else []
        return [buf.rstrip()] if buf.strip() else []

    def _step(self, events: list[Event]) -> bool:
        """Moves through the buffer as far as it can; True when the state changed and there may be more to do."""
        if self._state == "start":
            return self._step_start()
        if self._state == "text":
            return self._step_text(events)
        if self._state == "call":
            return self._step_call(events)
        return False  # "json": wait for the end

    def _step_start(self) -> bool:
        head = self._buf.lstrip()
        if not head or (len(head) < len(TOOL_CALL_OPEN) and TOOL_CALL_OPEN.startswith(head)):
            return False
        self._buf = head
        self._state = "json" if head[0] in "{[" else "text"
        return True

    def _step_text(self, events: list[Event]) -> bool:
        i = self._buf.find(TOOL_CALL_OPEN)
        if i >= 0:
            _emit(events, self._buf[:i].rstrip())
            self._buf, self._state = self._buf[i + len(TOOL_CALL_OPEN):], "call"
            return True
        # Hold back a possible start of the tag, and trailing whitespace (it may precede a call).
        keep = _partial_tag_len(self._buf)
        body, tail = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
        stripped = body.rstrip()
        _emit(events, stripped)
        self._buf = body[len(stripped):] + tail
        return False

    def _step_call(self, events: list[Event]) -> bool:
        j = self._buf.find(TOOL_CALL_CLOSE)
        if j < 0:
            return False
        body = self._buf[:j]
        events.append(parse_call_block(body, TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE))
        self._buf, self._state = self._buf[j + len(TOOL_CALL_CLOSE):], "start"
        return True


def parse_call_block(body: str, raw: str) -> ParsedCall:
    """The call inside one `<tool_call>` block (exactly one call expected)."""
    calls = parse_json_calls(body)
    if calls is None or len(calls) != 1:
        return ParsedCall(_guess_name(body), None, raw,
                          'a <tool_call> block must hold one JSON object {"name": ..., "arguments": {...}}')
    return calls[0]


def parse_json_calls(text: str) -> list[ParsedCall] | None:
    """The calls in a reply that is only JSON, or None when it is not shaped like tool calls at all."""
    items = _json_items(text)
    if not items or not all(isinstance(i, dict) and isinstance(_unwrap(i).get("name"), str) for i in items):
        return None
    return [_to_call(_unwrap(i)) for i in items]


def _json_items(text: str) -> list[Any] | None:
    try:
        value = json.loads(text, strict=False)  # strict=False: raw control characters inside strings
    except ValueError:
        try:
            value = [json.loads(line, strict=False) for line in text.splitlines() if line.strip()]
        except ValueError:
            return None
    return value if isinstance(value, list) else [value]


def _unwrap(item: dict[str, Any]) -> dict[str, Any]:
    function = item.get("function")
    return function if isinstance(function, dict) and "name" in function else item


def _to_call(item: dict[str, Any]) -> ParsedCall:
    name = item["name"]
    args = item.get("arguments", item.get("parameters", {}))
    raw = json.dumps(item, ensure_ascii=False)
    if isinstance(args, str):
        try:
            args = json.loads(args, strict=False) if args.strip() else {}
        except ValueError:
            return ParsedCall(name, None, args, f"the arguments of {name!r} are not valid JSON")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return ParsedCall(name, None, json.dumps(args, ensure_ascii=False),
                          f"the arguments of {name!r} are not a JSON object")
    return ParsedCall(name, args, raw)


def _emit(events: list[Event], text: str) -> None:
    if text:
        events.append(text)


def _partial_tag_len(buf: str) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of the opening tag."""
    for k in range(min(len(buf), len(TOOL_CALL_OPEN) - 1), 0, -1):
        if buf.endswith(TOOL_CALL_OPEN[:k]):
            return k
    return 0


def _guess_name(text: str) -> str | None:
    match = _NAME.search(text)
    return match.group(1) if match else None
