"""`bind_tools(strict=True)`: a call whose arguments do not match its tool's schema is an invalid call. The
reference for which arguments match is pydantic's strict validation of the tool's own argument model."""
from __future__ import annotations

import json

import pytest
from langchain_core.tools import StructuredTool
from pydantic import ValidationError

from braid_langchain.streaming import ReplyBuilder, with_errors
from braid_langchain.strict_tools import argument_validators, checked
from braid_langchain.tool_parser import ParsedCall
from braid_langchain.tools import to_openai_tools
from braidinfer.guided import GuidedDecoding
from tests.langchain.test_tool_parsing import collect, engine_chunk


def get_forecast(city: str, days: int = 1) -> str:
    """Get the weather forecast for a city.

    Args:
        city: the city
        days: how many days ahead
    """
    return "sunny"


ARGUMENTS = [{"city": "Paris"}, {"city": "Paris", "days": 2}, {"days": 2}, {"city": 3}, {"city": "Paris", "days": 2.5},
             {"city": "Paris", "days": "2"}, {"city": None}, {}]


def _pydantic_accepts(args) -> bool:
    try:
        StructuredTool.from_function(get_forecast).args_schema.model_validate(args, strict=True)
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize("args", ARGUMENTS)
def test_a_call_is_valid_exactly_when_the_tools_own_model_accepts_its_arguments(args):
    validators = argument_validators(to_openai_tools([get_forecast]))
    call = ParsedCall("get_forecast", args, json.dumps({"name": "get_forecast", "arguments": args}))
    result = checked(call, validators)
    assert (result.args is not None) is _pydantic_accepts(args)
    assert result == call if result.args is not None else result.error.startswith(
        "the arguments of 'get_forecast' do not match its schema")


def test_calls_already_invalid_or_to_other_tools_are_left_alone():
    validators = argument_validators(to_openai_tools([get_forecast]))
    broken = ParsedCall("get_forecast", None, '{"city": ', "malformed")
    other = ParsedCall("get_time", {"zone": 1}, "{}")
    assert checked(broken, validators) is broken and checked(other, validators) is other


def test_the_builder_turns_a_mismatched_call_into_an_invalid_one_streamed_and_collected():
    validators = argument_validators(to_openai_tools([get_forecast]))
    text = '<tool_call>{"name": "get_forecast", "arguments": {"city": "Paris", "days": "two"}}</tool_call>'
    streamed = ReplyBuilder("m", "auto", validators=validators)
    chunks = collect(streamed, [text, ""])
    full = chunks[0].message
    for chunk in chunks[1:]:
        full = full + chunk.message
    collected = ReplyBuilder("m", "auto", validators=validators)
    collected.collect(engine_chunk(text, "stop"))
    for message in (with_errors(full, streamed.errors), collected.result().generations[0].message):
        assert message.tool_calls == [] and message.response_metadata["finish_reason"] == "stop"
        [invalid] = message.invalid_tool_calls
        assert invalid["name"] == "get_forecast" and "at 'days'" in invalid["error"]
        assert json.loads(invalid["args"])["arguments"] == {"city": "Paris", "days": "two"}
    lax = collect(ReplyBuilder("m", "auto"), [text, ""])[0].message
    assert [c["args"] for c in lax.tool_calls] == [{"city": "Paris", "days": "two"}]


def test_a_schema_that_is_not_json_schema_fails_at_bind_time_only_with_strict(chat):
    bad = {"type": "function", "function": {"name": "lookup", "description": "Look up.",
                                            "parameters": {"type": "object", "properties": {"q": {"type": 5}}}}}
    chat.bind_tools([bad])  # not checked without strict
    with pytest.raises(ValueError, match="tool 'lookup' has an invalid argument schema"):
        chat.bind_tools([bad], strict=True)


def test_strict_checks_a_call_the_model_writes_in_auto_mode(chat):
    """The reply is steered (by a JSON-schema constraint) into a bare call whose `days` is a string: bound with
    strict=True it comes back invalid; without, as a call with the string."""
    call_schema = {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                   "properties": {"name": {"const": "get_forecast"},
                                  "arguments": {"type": "object", "additionalProperties": False,
                                                "required": ["city", "days"],
                                                "properties": {"city": {"type": "string", "maxLength": 8},
                                                               "days": {"type": "string", "maxLength": 3}}}}}
    steer = GuidedDecoding(json_schema=call_schema)
    ask = "What is the forecast for Paris?"
    lax = chat.bind_tools([get_forecast]).invoke(ask, guided=steer, max_tokens=64)
    strict = chat.bind_tools([get_forecast], strict=True).invoke(ask, guided=steer, max_tokens=64)
    [call] = lax.tool_calls
    assert isinstance(call["args"]["days"], str) and lax.invalid_tool_calls == []
    assert strict.tool_calls == []
    [invalid] = strict.invalid_tool_calls
    assert invalid["name"] == "get_forecast" and "at 'days'" in invalid["error"] and "is not of type 'integer'" in \
        invalid["error"]


def test_a_mismatched_call_before_max_tokens_cut_the_reply_is_not_called_cut():
    validators = argument_validators(to_openai_tools([get_forecast]))
    text = '<tool_call>{"name": "get_forecast", "arguments": {"city": 3}}</tool_call> and then'
    builder = ReplyBuilder("m", "auto", validators=validators)
    builder.collect(engine_chunk(text, "length"))
    [invalid] = builder.result().generations[0].message.invalid_tool_calls
    assert invalid["error"].startswith("the arguments of 'get_forecast' do not match its schema at 'city'")
