"""Finds tool calls in a model's reply, incrementally, so text can stream while calls are held back. Pure.

Recognised forms (one reply may hold several calls):
- blocks of the model's own format anywhere in the reply, by default Qwen / Hermes style
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (see `braid_langchain.tool_formats` for the others:
  a block may hold one call, a JSON list of calls, or Mistral's `name[ARGS]{...}`, and may run to the reply's end);
- a reply that is only JSON: one object `{"name": ..., "arguments": {...}}`, a list of them, or one per line
  (`"parameters"` is accepted for `"arguments"`, as is the OpenAI `{"function": {...}}` wrapping, and
  arguments given as a JSON string). Outside a block, JSON is a call only when shaped exactly like one (no keys
  but a call's): otherwise it is the answer, e.g. an object of a `response_format` that has a "name" field.
Where the bound tools are known, a call to another name (in a block or bare) is an invalid call. Malformed calls
come out as `ParsedCall`s with `args=None` and an `error`, as does a JSON reply that starts like a call but does
not parse (e.g. cut by max_tokens); parsing never raises. The whitespace between text and a call is kept once.
"""
from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r'"name"\s*:\s*"([^"]+)"')
_CALL_START = re.compile(r'\[?\s*\{\s*"name"\s*:')
_CUT_NAME = re.compile(r'\[?\s*\{\s*"name"\s*:\s*(?:"([^"]*))?$')  # a reply that ends in its first name


@dataclass(frozen=True)
class ParsedCall:
    """One call as the model wrote it. `args` is None when the call is malformed; `error` then says why."""

    name: str | None
    args: dict[str, Any] | None
    raw: str
    error: str | None = None


Event = str | ParsedCall  # a piece of reply text, or a complete call


def parse_tool_calls(text: str, *, forced: bool = False, open_tag: str = TOOL_CALL_OPEN,
                     close_tag: str | None = TOOL_CALL_CLOSE, tools: Collection[str] | None = None
                     ) -> tuple[str, list[ParsedCall]]:
    """A finished reply split into its text (calls removed, whitespace trimmed) and its calls, in order."""
    stream = ToolCallStream(forced=forced, open_tag=open_tag, close_tag=close_tag, tools=tools)
    events = stream.feed(text) + stream.finish()
    return "".join(e for e in events if isinstance(e, str)), [e for e in events if isinstance(e, ParsedCall)]


class ToolCallStream:
    """Feed reply text as it arrives; get back text that is certainly not part of a call, and each call once
    it is complete. `forced`: tool_choice demanded a call, which constrained decoding wrote (as JSON, or in a block
    of the format): a reply without one ends in an invalid call that says so. `open_tag` / `close_tag`: what frames
    a block of calls (`close_tag` None: the block runs to the end of the reply). `tools`: the names of the bound
    tools (None: unknown); a call to another name is invalid (a forced call's names are constrained: not checked).

    States: "start" (only whitespace so far, or since the last block: a leading `{` or `[` means a JSON reply),
    "text", "call" (inside `<tool_call>`), "json" (a JSON reply, parsed at the end).
    """

    def __init__(self, *, forced: bool = False, open_tag: str = TOOL_CALL_OPEN,
                 close_tag: str | None = TOOL_CALL_CLOSE, tools: Collection[str] | None = None):
        self._state = "start"
        self._forced = forced
        self._tools = None if tools is None or forced else frozenset(tools)
        self._open, self._close = open_tag, close_tag
        self._buf = ""
        self._num_calls = 0
        self._wrote = False  # some text was given out
        self._gap = ""  # whitespace dropped around calls: given out before the next text, if text came before

    def feed(self, delta: str) -> list[Event]:
        self._buf += delta
        events: list[Event] = []
        while self._step(events):
            pass
        self._num_calls += sum(isinstance(e, ParsedCall) for e in events)
        return events

    def finish(self) -> list[Event]:
        """Everything still held back, at the end of the reply."""
        events = self._finish_state()
        if self._forced and not self._num_calls and all(isinstance(e, str) for e in events):
            # No call where one was demanded: a stop string hit first, or a reasoning model's thought used up
            # max_tokens. The held-back text is what the model wrote of it.
            text = "".join(e for e in events if isinstance(e, str))
            return [ParsedCall(None, None, text, "the reply holds no tool call")]
        return events

    def _finish_state(self) -> list[Event]:
        """What `finish` gives out in the present state."""
        buf, state, self._buf = self._buf, self._state, ""
        events: list[Event] = []
        if state == "call":  # a block cut inside its closing tag still holds its whole calls
            body = buf[:len(buf) - _partial_tag_len(buf, self._close)] if self._close else buf
            return parse_call_block(body, self._open + buf, self._open, self._tools)
        if state == "json":
            calls = parse_json_calls(buf, bare=not self._forced, tools=self._tools)
            if calls is not None:
                return calls
            if self._forced or self._broken_call(buf):
                return [ParsedCall(_guess_name(buf), None, buf, "the reply is not a complete JSON tool call")]
        self._emit(events, buf.rstrip())
        return events

    def _broken_call(self, text: str) -> bool:
        """Whether a reply that is no call was meant as one: it does not parse (e.g. cut by max_tokens), and it
        names a bound tool (or ends in the start of one's name) or, the tools unknown, opens with a "name" key."""
        if _json_items(text) is not None:
            return False
        if self._tools is None:
            return _CALL_START.match(text) is not None
        if cut := _CUT_NAME.match(text):
            return any(t.startswith(cut.group(1) or "") for t in self._tools)
        return _guess_name(text) in self._tools

    def _emit(self, events: list[Event], text: str) -> None:
        if not text:
            return
        events.append(self._gap + text if self._wrote else text)
        self._wrote, self._gap = True, ""

    def _hold_gap(self, whitespace: str) -> None:
        self._gap = self._gap or whitespace  # one separator where a call was: the whitespace before it, or after

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
        if not head or (len(head) < len(self._open) and self._open.startswith(head)):
            return False
        self._hold_gap(self._buf[:len(self._buf) - len(head)])
        self._buf = head
        self._state = "json" if head[0] in "{[" and not head.startswith(self._open) else "text"
        return True

    def _step_text(self, events: list[Event]) -> bool:
        i = self._buf.find(self._open)
        if i >= 0:
            before = self._buf[:i]
            self._emit(events, before.rstrip())
            self._hold_gap(before[len(before.rstrip()):])
            self._buf, self._state = self._buf[i + len(self._open):], "call"
            return True
        # Hold back a possible start of the tag, and trailing whitespace (it may precede a call).
        keep = _partial_tag_len(self._buf, self._open)
        body, tail = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
        stripped = body.rstrip()
        self._emit(events, stripped)
        self._buf = body[len(stripped):] + tail
        return False

    def _step_call(self, events: list[Event]) -> bool:
        j = self._buf.find(self._close) if self._close is not None else -1
        if j < 0:
            return False
        body = self._buf[:j]
        events.extend(parse_call_block(body, self._open + body + self._close, self._open, self._tools))
        self._buf, self._state = self._buf[j + len(self._close):], "start"
        return True


def parse_call_block(body: str, raw: str, open_tag: str = TOOL_CALL_OPEN, tools: Collection[str] | None = None
                     ) -> list[ParsedCall]:
    """The calls inside one block: a JSON object, a JSON list of them, or Mistral's `name[ARGS]{...}` (several
    joined by `open_tag`). A malformed block is one invalid call; so is a call to a name not in `tools` (None:
    unknown)."""
    if _ARGS in body and not body.lstrip().startswith(("{", "[")):
        return [_named_args_call(part, open_tag + part, tools) for part in body.split(open_tag) if part.strip()]
    calls = parse_json_calls(body, tools=tools)
    if not calls:
        return [ParsedCall(_guess_name(body), None, raw,
                           f'a {open_tag} block must hold one JSON object {{"name": ..., "arguments": {{...}}}} '
                           "or a JSON list of them")]
    return calls


_ARGS = "[ARGS]"  # Mistral's templates since v0.3 tekken: [TOOL_CALLS]name[ARGS]{...}


def _named_args_call(part: str, raw: str, tools: Collection[str] | None) -> ParsedCall:
    name, _, args = part.partition(_ARGS)
    name = name.strip()
    try:
        value = json.loads(args, strict=False)
    except ValueError:
        return ParsedCall(name or None, None, raw, f"the arguments of {name!r} are not valid JSON")
    if not name or not isinstance(value, dict):
        return ParsedCall(name or None, None, raw, f"the arguments of {name!r} are not a JSON object")
    return _bound(ParsedCall(name, value, raw), tools)


def parse_json_calls(text: str, *, bare: bool = False, tools: Collection[str] | None = None
                     ) -> list[ParsedCall] | None:
    """The calls in JSON text, or None when it is not shaped like tool calls at all. `bare`: the text is a whole
    reply, not a call block, so every item must have no keys but a call's. With `tools`, a call to a name that is
    not a bound tool is invalid."""
    items = _json_items(text)
    if not items or not all(_is_call(i, bare) for i in items):
        return None
    return [_bound(_to_call(_unwrap(i)), tools) for i in items]


def _bound(call: ParsedCall, tools: Collection[str] | None) -> ParsedCall:
    """`call`, or an invalid call when the bound tools are known and none has its name."""
    if tools is None or call.name in tools:
        return call
    return ParsedCall(call.name, None, call.raw, f"no bound tool is named {call.name!r}")


_CALL_KEYS = frozenset({"name", "arguments", "parameters", "function", "type", "id"})


def _is_call(item: Any, bare: bool) -> bool:
    if not isinstance(item, dict) or not isinstance((call := _unwrap(item)).get("name"), str):
        return False
    return not bare or (item.keys() <= _CALL_KEYS and call.keys() <= _CALL_KEYS)


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


def _partial_tag_len(buf: str, tag: str) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of `tag`."""
    for k in range(min(len(buf), len(tag) - 1), 0, -1):
        if buf.endswith(tag[:k]):
            return k
    return 0


def _guess_name(text: str) -> str | None:
    match = _NAME.search(text)
    return match.group(1) if match else None
