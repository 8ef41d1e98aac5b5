"""Tool-call parsing, tool schemas and chunk building (pure; expected values written by hand)."""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from langchain_core.documents import Document

from braid_langchain.streaming import ReplyBuilder, with_errors
from braid_langchain.documents import render_documents
from braid_langchain.tool_parser import ParsedCall, ToolCallStream, parse_tool_calls
from braid_langchain.tools import (
    close_objects,
    forced_call_schema,
    normalize_tool_choice,
    template_supports_tools,
    tool_prompt,
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather at a place.",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Current time.",
                                         "parameters": {"type": "object", "properties": {}}}}


def call(name, args):
    return ParsedCall(name, args, json.dumps({"name": name, "arguments": args}))


def named(calls):
    return [(c.name, c.args) for c in calls]


# --- parsing finished replies ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text, content, calls", [
    ("The answer is 4.", "The answer is 4.", []),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "",
     [call("get_weather", {"city": "Paris"})]),
    ('Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
     '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\nDone.', "Let me check.\nDone.",
     [call("get_weather", {"city": "Paris"}), call("get_time", {})]),
    ('Hello <tool_call>{"name": "get_time", "arguments": {}}</tool_call> bye', "Hello bye", [call("get_time", {})]),
    ('Hello<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n\nbye', "Hello\n\nbye",
     [call("get_time", {})]),
    ('  <tool_call>{"name": "get_time", "arguments": {}}</tool_call> bye ', "bye", [call("get_time", {})]),
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', "", [call("get_weather", {"city": "Paris"})]),
    ('  [{"name": "get_time", "arguments": {}}, {"name": "get_time", "parameters": {}}]', "",
     [call("get_time", {}), call("get_time", {})]),
    ('{"name": "get_time", "arguments": {}}\n{"name": "get_weather", "arguments": {"city": "Rome"}}', "",
     [call("get_time", {}), call("get_weather", {"city": "Rome"})]),
    ('{"type": "function", "function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}}', "",
     [call("get_weather", {"city": "Oslo"})]),
    ('{"setup": "Why?", "punchline": "Because."}', '{"setup": "Why?", "punchline": "Because."}', []),
    ("{not json at all", "{not json at all", []),
    ("a < b and <tool", "a < b and <tool", []),
])
def test_parse_finished_reply(text, content, calls):
    parsed_content, parsed_calls = parse_tool_calls(text)
    assert (parsed_content, named(parsed_calls)) == (content, named(calls))


def test_malformed_calls_become_invalid_never_exceptions():
    content, calls = parse_tool_calls('<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>')
    assert content == "" and len(calls) == 1
    assert calls[0].name == "get_weather" and calls[0].args is None and "one JSON object" in calls[0].error
    assert calls[0].raw == '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'

    _, calls = parse_tool_calls('{"name": "get_weather", "arguments": ["Paris"]}')
    assert calls == [
        ParsedCall("get_weather", None, '["Paris"]', "the arguments of 'get_weather' are not a JSON object")]

    _, calls = parse_tool_calls('{"name": "get_weather", "arguments": "Paris"}')
    assert calls == [ParsedCall("get_weather", None, "Paris", "the arguments of 'get_weather' are not valid JSON")]

    _, calls = parse_tool_calls('<tool_call>{"name": "get_time", "arguments": {}}')  # never closed
    assert calls == [call("get_time", {})]

    _, calls = parse_tool_calls('{"name": "get_weather", "arguments": {"ci', forced=True)  # cut at max_tokens
    assert calls[0].name == "get_weather" and calls[0].args is None


def test_a_json_answer_is_a_call_only_when_shaped_like_one_to_a_bound_tool():
    person = '{"name": "Alice", "age": 30}'  # e.g. a response_format object with a "name" field
    assert parse_tool_calls(person) == (person, [])
    assert parse_tool_calls(person, tools=["get_weather"]) == (person, [])
    unbound = '{"name": "search", "arguments": {}}'  # shaped like a call to a tool that is not bound: invalid
    assert parse_tool_calls(unbound, tools=["get_weather"]) == (
        "", [ParsedCall("search", None, unbound, "no bound tool is named 'search'")])
    assert parse_tool_calls(unbound) == ("", [call("search", {})])  # bound tools unknown
    both = '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time"}]'
    content, calls = parse_tool_calls(both, tools=["get_weather", "get_time"])
    assert content == "" and [(c.name, c.args) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    _, calls = parse_tool_calls(both, tools=["get_weather"])  # the valid call is kept beside the invalid one
    assert [(c.name, c.args is None) for c in calls] == [("get_weather", False), ("get_time", True)]
    mixed = '[{"name": "get_weather", "arguments": {}}, {"name": "Alice", "age": 30}]'
    assert parse_tool_calls(mixed, tools=["get_weather"]) == (mixed, [])  # one item is no call: all text
    wrapped = '{"type": "function", "function": {"name": "get_time", "arguments": "{}"}}'
    assert [(c.name, c.args) for c in parse_tool_calls(wrapped, tools=["get_time"])[1]] == [("get_time", {})]
    # Inside a call block the model meant a call, whatever it names: kept, and invalid when it is no bound tool.
    block = '<tool_call>{"name": "Alice", "age": 30}</tool_call>'
    content, calls = parse_tool_calls(block, tools=["get_weather"])
    assert content == "" and [(c.name, c.args, c.error) for c in calls] == [
        ("Alice", None, "no bound tool is named 'Alice'")]
    assert [(c.name, c.args) for c in parse_tool_calls(block)[1]] == [("Alice", {})]  # bound tools unknown
    # A forced reply is one constrained call.
    assert parse_tool_calls('{"name": "get_time", "arguments": {}}', forced=True, tools=[]) == (
        "", [call("get_time", {})])


@pytest.mark.parametrize("tools", [["get_weather"], None])
def test_a_json_reply_that_starts_like_a_call_but_does_not_parse_is_an_invalid_call(tools):
    cut = '{"name": "get_weather", "arguments": {"city": "Par'  # e.g. max_tokens
    assert parse_tool_calls(cut, tools=tools) == (
        "", [ParsedCall("get_weather", None, cut, "the reply is not a complete JSON tool call")])
    after_text = 'Checking. <tool_call>{"name": "get_weather", "arguments": {}}</tool_call> ' + cut
    content, calls = parse_tool_calls(after_text, tools=tools)
    assert content == "Checking." and [(c.name, c.args is None) for c in calls] == [
        ("get_weather", False), ("get_weather", True)]
    for cut_in_name in ('{"name": "get_wea', '{"name": '):
        assert parse_tool_calls(cut_in_name, tools=tools) == (
            "", [ParsedCall(None, None, cut_in_name, "the reply is not a complete JSON tool call")])
    # JSON answers that do not parse stay text: another name than a bound tool's, or no leading "name" key.
    for other in ('{"name": "Alice", "age":', '{"name": "Ali'):
        assert parse_tool_calls(other, tools=["get_weather"]) == (other, [])
    answer = '{"setup": "Why?", "punchline": "Becau'
    assert parse_tool_calls(answer, tools=tools) == (answer, [])


def test_streaming_holds_back_only_what_may_be_a_call():
    stream = ToolCallStream()
    assert stream.feed("Sure") == ["Sure"]
    assert stream.feed(", one moment <tool") == [", one moment"]  # "<tool" may open a call; " " may precede one
    assert stream.feed('_call>{"name": "get_time", ') == []
    assert stream.feed('"arguments": {}}</tool_call> ok') == [call("get_time", {}), " ok"]  # one separator kept
    assert stream.finish() == []


def test_streaming_char_by_char_equals_whole():
    text = 'Hi there.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\nBye  '
    stream = ToolCallStream()
    events = [e for ch in text for e in stream.feed(ch)] + stream.finish()
    assert "".join(e for e in events if isinstance(e, str)) == "Hi there.\nBye"
    assert [e for e in events if isinstance(e, ParsedCall)] == [call("get_weather", {"city": "Paris"})]


# --- tool choice and schemas ----------------------------------------------------------------------------------
@pytest.mark.parametrize("choice, expected", [
    (None, "auto"), ("auto", "auto"), ("none", "none"), (False, "none"), ("any", "any"), ("required", "any"),
    (True, "any"), ("get_time", "get_time"), ({"type": "function", "function": {"name": "get_time"}}, "get_time"),
    ({"type": "auto"}, "auto"), ({"type": "none"}, "none"), ({"type": "any"}, "any"), ({"type": "required"}, "any"),
    ({"type": "tool", "name": "get_time"}, "get_time"),  # Anthropic
    ({"type": "function", "name": "get_time"}, "get_time"),  # OpenAI responses
])
def test_normalize_tool_choice(choice, expected):
    assert normalize_tool_choice(choice, ["get_weather", "get_time"]) == expected


def test_unknown_tool_choice_names_the_bound_tools():
    with pytest.raises(ValueError, match=r"names no bound tool; bound tools: \['get_time'\]"):
        normalize_tool_choice("get_weather", ["get_time"])
    with pytest.raises(ValueError, match=r"'get_weather' names no bound tool"):
        normalize_tool_choice({"type": "tool", "name": "get_weather"}, ["get_time"])


@pytest.mark.parametrize("choice", [{"type": "function"}, {"type": "web_search"}, {"name": "get_time"}])
def test_unsupported_tool_choice_forms_say_so(choice):
    with pytest.raises(ValueError, match=r"unsupported tool_choice form .*\{'type': 'tool', 'name': \.\.\.\}"):
        normalize_tool_choice(choice, ["get_time"])


def test_forced_call_schema():
    one = {"type": "object", "properties": {"name": {"const": "get_time"},
                                            "arguments": {"type": "object", "properties": {},
                                                          "additionalProperties": False}},
           "required": ["name", "arguments"], "additionalProperties": False}
    assert forced_call_schema([WEATHER, TIME], "get_time") == one
    both = forced_call_schema([WEATHER, TIME], "any")
    assert [o["properties"]["name"]["const"] for o in both["anyOf"]] == ["get_weather", "get_time"]
    assert both["anyOf"][0]["properties"]["arguments"]["required"] == ["city"]


def test_forced_call_schema_moves_defs_to_the_root():
    params = {"type": "object", "properties": {"where": {"$ref": "#/$defs/Place"}},
              "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    tool = {"type": "function", "function": {"name": "go", "parameters": params}}
    schema = forced_call_schema([tool], "go")
    assert schema["properties"]["arguments"]["properties"]["where"] == {"$ref": "#/$defs/go.Place"}
    assert schema["$defs"] == {"go.Place": {"type": "object", "properties": {"city": {"type": "string"}},
                                            "additionalProperties": False}}


def test_close_objects_leaves_explicit_choices_and_property_names_alone():
    schema = {"type": "object", "properties": {"properties": {"type": "string"},
                                               "extra": {"type": "object", "additionalProperties": True,
                                                         "properties": {}}}}
    assert close_objects(schema) == {**schema, "additionalProperties": False}


def test_template_tool_support_and_prompt():
    assert template_supports_tools("{% if tools %}...{% endif %}")
    assert not template_supports_tools("{{ message['content'] }}") and not template_supports_tools(None)
    prompt = tool_prompt([TIME])
    assert '{"name": "get_time", "description": "Current time.", "parameters": {"type": "object", ' in prompt
    assert '{"name": <tool name>, "arguments": <arguments object>}' in prompt


# --- engine chunks -> LangChain chunks ------------------------------------------------------------------------
def engine_chunk(text, finish_reason=None, prompt=20, cached=16, completion=5):
    usage = SimpleNamespace(prompt_tokens=prompt, cached_prompt_tokens=cached, completion_tokens=completion)
    return SimpleNamespace(text=text, finish_reason=finish_reason, usage=usage if finish_reason else None)


def collect(builder, texts):
    chunks = [c for t in texts[:-1] for c in builder.add(engine_chunk(t))]
    return chunks + builder.add(engine_chunk(texts[-1], "stop"))


def test_text_chunks_and_exactly_one_usage_chunk():
    chunks = collect(ReplyBuilder("m"), ["Hel", "lo", ""])
    assert [c.message.content for c in chunks] == ["Hel", "lo", ""]
    assert [c.message.usage_metadata is not None for c in chunks] == [False, False, True]
    last = chunks[-1].message
    assert last.chunk_position == "last"
    assert last.usage_metadata == {"input_tokens": 20, "output_tokens": 5, "total_tokens": 25,
                                   "input_token_details": {"cache_read": 16, "cache_creation": 4}}
    assert last.response_metadata == {"model_name": "m", "finish_reason": "stop", "model_provider": "braid"}


def test_tool_calls_stream_as_tool_call_chunks():
    texts = ["Checking.", "<tool_call>", '{"name": "get_time", "arguments": {}}', "</tool_call>",
             '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>']
    chunks = collect(ReplyBuilder("m", "auto"), texts)
    full = chunks[0].message
    for c in chunks[1:]:
        full = full + c.message
    assert full.content == "Checking."
    assert [(tc["name"], tc["args"]) for tc in full.tool_calls] == [("get_time", {})]
    assert [tc["name"] for tc in full.invalid_tool_calls] == ["get_weather"]
    assert [tcc["index"] for tcc in full.tool_call_chunks] == [0, 1]


def test_truncated_forced_call_stays_invalid_after_lenient_merge():
    builder = ReplyBuilder("m", "forced")
    texts = ['{"name": "get_weather", ', '"arguments": {"city": "Par']
    chunks = [c for t in texts[:-1] for c in builder.add(engine_chunk(t))]
    chunks += builder.add(engine_chunk(texts[-1], "length"))
    full = chunks[0].message
    for c in chunks[1:]:
        full = full + c.message
    assert full.tool_calls == [] and full.invalid_tool_calls[0]["name"] == "get_weather"
    assert full.response_metadata["finish_reason"] == "length"
    message = with_errors(full, builder.errors)
    assert message.invalid_tool_calls[0]["error"] == (
        "the reply was cut by max_tokens (finish_reason 'length') inside this call: "
        "the reply is not a complete JSON tool call")
    assert message.invalid_tool_calls[0]["args"] == "".join(texts)  # the text the model wrote, not JSON-quoted


@pytest.mark.parametrize("finish, error", [
    ("stop", "the reply holds no tool call"),  # e.g. a stop string hit first
    ("length", "the reply holds no tool call (finish_reason 'length'; raise max_tokens)"),
])
def test_an_empty_forced_reply_is_an_invalid_call_not_a_call_named_nothing(finish, error):
    streamed, collected = ReplyBuilder("m", "forced"), ReplyBuilder("m", "forced")
    chunks = streamed.add(engine_chunk("", finish))
    collected.collect(engine_chunk("", finish))
    for message in (with_errors(chunks[0].message, streamed.errors), collected.result().generations[0].message):
        assert message.tool_calls == []
        assert [(tc["name"], tc["args"], tc["error"]) for tc in message.invalid_tool_calls] == [(None, "", error)]
        assert message.response_metadata["finish_reason"] == finish


def test_finish_reason_is_tool_calls_when_a_call_ends_the_turn():
    call = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    assert collect(ReplyBuilder("m", "auto"), [call, ""])[-1].message.response_metadata["finish_reason"] == \
        "tool_calls"
    assert collect(ReplyBuilder("m", "auto"), ["No call.", ""])[-1].message.response_metadata["finish_reason"] == \
        "stop"
    bad = '<tool_call>{"name": "get_time"</tool_call>'
    assert collect(ReplyBuilder("m", "auto"), [bad, ""])[-1].message.response_metadata["finish_reason"] == "stop"


def test_parallel_tool_calls_false_keeps_the_first_call_only():
    two = ('<tool_call>{"name": "a", "arguments": {}}</tool_call>'
           '<tool_call>{"name": "b", "arguments": {}}</tool_call>')
    names = lambda builder: [c["name"] for ch in collect(builder, [two, ""])  # noqa: E731
                             for c in ch.message.tool_call_chunks]
    assert names(ReplyBuilder("m", "auto")) == ["a", "b"]
    assert names(ReplyBuilder("m", "auto", max_calls=1)) == ["a"]


def test_cache_read_is_capped_by_what_was_cached_before_the_call():
    builder = ReplyBuilder("m")
    builder.max_cache_read = 8  # pinning computed tokens 8..16 in this call; the engine saw 16 cached
    usage = builder.add(engine_chunk("", "stop"))[-1].message.usage_metadata
    assert usage["input_token_details"] == {"cache_read": 8, "cache_creation": 12}


@pytest.mark.parametrize("mode, max_calls, texts, finish", [
    ("off", None, ["Hel", "lo", " there", ""], "stop"),
    ("off", None, [], "length"),
    ("auto", None, ["Checking.", "<tool_call>", '{"name": "get_time", "arguments": {}}', "</tool_call>",
                    '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'], "stop"),
    ("auto", 1, ['<tool_call>{"name": "a", "arguments": {}}</tool_call>',
                 '<tool_call>{"name": "b", "arguments": {}}</tool_call>', ""], "stop"),
    ("forced", None, ['{"name": "get_weather", ', '"arguments": {"city": "Par'], "length"),
    ("forced", None, ['{"name": "get_weather", ', '"arguments": {"city": "Paris"}}'], "stop"),
    ("forced", None, [], "length"),
    ("auto", None, ['Hello <tool_call>{"name": "get_time", "arguments": {}}</tool_call> ', "bye"], "stop"),
    ("auto", None, ['{"name": "get_weather", ', '"arguments": {"city": "Par'], "length"),
])
def test_collected_reply_and_result_equal_langchains_merge_of_the_streamed_chunks(mode, max_calls, texts, finish):
    from langchain_core.language_models.chat_models import generate_from_stream

    streamed, collected = ReplyBuilder("m", mode, max_calls=max_calls), ReplyBuilder("m", mode, max_calls=max_calls)
    streamed.max_cache_read = collected.max_cache_read = 10
    deltas = [engine_chunk(t) for t in texts] + [engine_chunk("", finish)]
    chunks = [c for d in deltas for c in streamed.add(d)]
    for d in deltas:
        collected.collect(d)
    expected = generate_from_stream(iter(chunks)).generations[0].message
    got = generate_from_stream(iter([collected.collected()])).generations[0].message

    def plain(message, errors):  # call ids are random per builder: number them in order
        dumped = json.dumps(with_errors(message, errors).model_dump(), sort_keys=True)
        for i, call_id in enumerate(dict.fromkeys(re.findall(r"call_[0-9a-f]{24}", dumped))):
            dumped = dumped.replace(call_id, f"call_{i}")
        return dumped

    assert plain(got, collected.errors) == plain(expected, streamed.errors)
    assert got.usage_metadata["input_token_details"]["cache_read"] == 10
    built = collected.result().generations[0].message  # the direct build (no tool calls) or the merge, errors in
    assert type(built) is type(expected) and plain(built, {}) == plain(expected, streamed.errors)


# --- documents ------------------------------------------------------------------------------------------------
def test_documents_render_in_a_stable_order():
    a = Document("Paris is in France.", metadata={"source": "a.txt"})
    b = Document("Rome is in Italy.", id="b")
    expected = ('Use the following documents to answer.\n'
                '<document source="a.txt">\nParis is in France.\n</document>\n'
                '<document source="b">\nRome is in Italy.\n</document>')
    assert render_documents([a, b]) == render_documents([b, a, b]) == expected
    assert render_documents([]) == ""
    assert render_documents(["plain text"], header="") == "<document>\nplain text\n</document>"


def test_any_of_schemas_hoists_each_ones_defs_and_renames_escaped_refs():
    from braid_langchain.tools import any_of_schemas

    response = {"type": "object", "properties": {"x": {"$ref": "#/$defs/a~1b"}, "y": {"$ref": "#/$defs/P%20Q"},
                                                 "z": {"$ref": "#/definitions/C/properties/v"}},
                "$defs": {"a/b": {"type": "string"}, "P Q": {"type": "integer"}},
                "definitions": {"C": {"type": "object", "properties": {"v": {"type": "string"}}}}}
    call = {"type": "object", "properties": {"w": {"$ref": "#/$defs/a~1b"}}, "$defs": {"a/b": {"type": "number"}}}
    assert any_of_schemas([call, response]) == {
        "anyOf": [{"type": "object", "properties": {"w": {"$ref": "#/$defs/0.a~1b"}}},
                  {"type": "object", "properties": {"x": {"$ref": "#/$defs/1.a~1b"}, "y": {"$ref": "#/$defs/1.P Q"},
                                                    "z": {"$ref": "#/$defs/1.C/properties/v"}}}],
        "$defs": {"0.a/b": {"type": "number"}, "1.a/b": {"type": "string"}, "1.P Q": {"type": "integer"},
                  "1.C": {"type": "object", "properties": {"v": {"type": "string"}}, "additionalProperties": False}}}
