"""`bind_tools(strict=True)`: every tool call's arguments are checked against the tool's JSON schema (with the
`jsonschema` package); a call whose arguments do not match it becomes an invalid call naming the first mismatch.
A required call is decoded under a grammar of the schemas already, so this matters for calls the model writes in
free text (tool_choice "auto"), which are parsed, not constrained. Pure apart from jsonschema."""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from braid_langchain.tool_parser import ParsedCall

Validators = Mapping[str, Any]  # tool name -> a jsonschema validator of its arguments


def argument_validators(tools: Sequence[dict[str, Any]]) -> Validators:
    """One validator per OpenAI-format tool dict, for its `parameters` schema (none: any object). Raises ValueError
    naming the tool when a schema is not a valid JSON schema. Built once per distinct set of tools: checking the
    schemas takes milliseconds, and the same tools come call after call."""
    return _validators(json.dumps(tools, sort_keys=True, default=str))


@functools.lru_cache(maxsize=64)
def _validators(tools_json: str) -> Validators:
    from jsonschema import exceptions, validators

    found = {}
    for tool in json.loads(tools_json):
        function = tool["function"]
        schema = function.get("parameters") or {"type": "object"}
        cls = validators.validator_for(schema)
        try:
            cls.check_schema(schema)
        except exceptions.SchemaError as e:
            raise ValueError(f"tool {function['name']!r} has an invalid argument schema, so strict=True cannot "
                             f"check its calls: {e.message}") from None
        found[function["name"]] = cls(schema)
    return MappingProxyType(found)  # shared by every call with these tools: read-only


def checked(call: ParsedCall, validators: Validators) -> ParsedCall:
    """`call`, or an invalid call when its arguments do not match its tool's schema (a call already invalid, or to
    a tool without a validator, is returned as it is)."""
    validator = validators.get(call.name) if call.args is not None else None
    if validator is None:
        return call
    errors = sorted(validator.iter_errors(call.args), key=lambda e: list(e.absolute_path))
    if not errors:
        return call
    where = "/".join(map(str, errors[0].absolute_path))
    return ParsedCall(call.name, None, call.raw, f"the arguments of {call.name!r} do not match its schema"
                                                 f"{f' at {where!r}' if where else ''}: {errors[0].message}")
