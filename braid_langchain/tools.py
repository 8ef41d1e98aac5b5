"""Tools as the model sees them: OpenAI-format tool dicts, the tool prompt for templates without tool support,
and the JSON schema that forces a call when `tool_choice` demands one. Pure functions.

A call is written `{"name": <tool name>, "arguments": {...}}` (json.dumps spacing, which is also what guided
decoding emits), so a forced call, a call in the history and the format the prompt asks for are the same text.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote

from langchain_core.utils.function_calling import convert_to_openai_tool

ToolChoice = str | bool | dict[str, Any] | None

_TOOL_PROMPT = (
    "You can call the following tools. Each is described by a JSON schema of its arguments:\n{tools}\n"
    'To call a tool, answer with only a JSON object of the form {{"name": <tool name>, "arguments": '
    "<arguments object>}}, one line per call. If no tool is needed, answer normally."
)


def to_openai_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """Converts BaseTools, functions, pydantic classes, TypedDicts and schema dicts to OpenAI tool dicts."""
    return [convert_to_openai_tool(t) for t in tools]


def tool_names(tools: Sequence[dict[str, Any]]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def normalize_tool_choice(tool_choice: ToolChoice, names: Sequence[str]) -> str:
    """"auto", "none", "any" (some tool must be called) or the name of the tool that must be called.

    Accepts None/"auto", "none"/False, "any"/"required"/True, a tool name, and the dict forms of the providers:
    `{"type": "auto" | "none" | "any" | "required"}`, `{"type": "function", "function": {"name": ...}}` (OpenAI
    chat), `{"type": "function", "name": ...}` (OpenAI responses) and `{"type": "tool", "name": ...}` (Anthropic).
    """
    if isinstance(tool_choice, dict):
        tool_choice = _dict_choice(tool_choice)
    if tool_choice is None or tool_choice == "auto":
        return "auto"
    if tool_choice is False or tool_choice == "none":
        return "none"
    if tool_choice is True or tool_choice in ("any", "required"):
        return "any"
    if not isinstance(tool_choice, str) or tool_choice not in names:
        raise ValueError(f"tool_choice {tool_choice!r} names no bound tool; bound tools: {list(names)} "
                         "(or use 'auto', 'none', 'any' or 'required')")
    return tool_choice


def _dict_choice(tool_choice: dict[str, Any]) -> str:
    """The string form of a dict `tool_choice`: its mode, or the name of the tool it names."""
    kind = tool_choice.get("type")
    if kind in ("auto", "none", "any", "required"):
        return kind
    function = tool_choice.get("function")
    name = function.get("name") if kind == "function" and isinstance(function, dict) else tool_choice.get("name")
    if kind not in ("function", "tool") or not isinstance(name, str):
        raise ValueError(f"unsupported tool_choice form {tool_choice!r}; use {{'type': 'auto' | 'none' | 'any' | "
                         "'required'}, {'type': 'function', 'function': {'name': ...}}, {'type': 'function', "
                         "'name': ...} or {'type': 'tool', 'name': ...}")
    return name


def template_supports_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders `tools=` itself (it mentions them); otherwise the tool prompt is used."""
    return bool(chat_template) and "tools" in chat_template


def tool_prompt(tools: Sequence[dict[str, Any]]) -> str:
    """System-prompt text describing `tools`, for chat templates that do not render tools themselves."""
    lines = [json.dumps(t["function"], ensure_ascii=False) for t in tools]
    return _TOOL_PROMPT.format(tools="\n".join(lines))


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """One call as the model is asked to write it."""
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


def forced_call_schema(tools: Sequence[dict[str, Any]], choice: str) -> dict[str, Any]:
    """JSON schema of one call to `choice` (a tool name) or, for "any", to any of `tools`.

    Each tool's `$defs` move to the root under `<tool>.<name>` (a nested `#/$defs/...` would not resolve).
    """
    chosen = [t["function"] for t in tools if choice == "any" or t["function"]["name"] == choice]
    defs: dict[str, Any] = {}
    options = [_call_schema(f["name"], f.get("parameters") or {}, defs) for f in chosen]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return schema | ({"$defs": defs} if defs else {})


def any_of_schemas(schemas: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """JSON schema of what matches any of `schemas`, e.g. a tool call or the response object. Each one's `$defs`
    move to the root under `<index>.<name>` (a nested `#/$defs/...` would not resolve)."""
    defs: dict[str, Any] = {}
    options = [_take_defs(schema, f"{i}.", defs) for i, schema in enumerate(schemas)]
    return {"anyOf": options} | ({"$defs": defs} if defs else {})


def _call_schema(name: str, parameters: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    arguments = close_objects({"type": "object", **_take_defs(parameters, f"{name}.", defs)})
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False}


def _take_defs(schema: dict[str, Any], prefix: str, defs: dict[str, Any]) -> dict[str, Any]:
    """`schema` without its `$defs` (or `definitions`), which go into `defs` as `<prefix><name>`, and with its
    references renamed to match."""
    schema = dict(schema)
    local_defs = {**schema.pop("$defs", {}), **schema.pop("definitions", {})}
    renames = {old: f"{prefix}{old}" for old in local_defs}
    defs.update({renames[k]: close_objects(_rename_refs(v, renames)) for k, v in local_defs.items()})
    return _rename_refs(schema, renames)


def _rename_refs(node: Any, renames: dict[str, str]) -> Any:
    if isinstance(node, list):
        return [_rename_refs(v, renames) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _rename_refs(v, renames) for k, v in node.items()}
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith(("#/$defs/", "#/definitions/")):
        segment, sep, rest = ref.split("/", 2)[2].partition("/")  # a definition, or a path inside one
        name = unquote(segment).replace("~1", "/").replace("~0", "~")  # a JSON pointer in a URI fragment
        if name in renames:
            segment = renames[name].replace("~", "~0").replace("/", "~1")
        out["$ref"] = f"#/$defs/{segment}{sep}{rest}"
    return out


def close_objects(schema: Any) -> Any:
    """Sets `additionalProperties: false` on every object schema that lists properties and says nothing about
    others, so constrained decoding emits exactly the declared fields (the engine compiles schemas non-strictly)."""
    if isinstance(schema, list):
        return [close_objects(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _close_each(v) if k in _SCHEMA_MAPS else close_objects(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions"})


def _close_each(mapping: Any) -> Any:
    # name -> schema maps: recurse into the schemas, never treat the map itself as a schema.
    return {k: close_objects(v) for k, v in mapping.items()} if isinstance(mapping, dict) else mapping
