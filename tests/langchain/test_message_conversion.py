"""Message conversion: LangChain messages -> chat-template dicts (pure; expected values written by hand)."""
from __future__ import annotations

import pytest
from langchain_core.messages import (
    AIMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from braid_langchain.messages import add_to_system, content_text, merge_consecutive, to_chat_messages

CALL = {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1", "type": "tool_call"}


def test_basic_roles():
    messages = [SystemMessage("Be brief."), HumanMessage("Hi", name="ann"), AIMessage("Hello!"),
                HumanMessage("Weather?")]
    assert to_chat_messages(messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Weather?"},
    ]


def test_tool_round_trip_in_template_convention():
    messages = [HumanMessage("Weather in Paris?"), AIMessage("", tool_calls=[CALL]),
                ToolMessage("sunny", tool_call_id="call_1", name="get_weather")]
    assert to_chat_messages(messages) == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "id": "call_1",
                         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1", "name": "get_weather"},
    ]  # ends with the tool result: the template adds the assistant header after it


def test_tool_calls_inline_for_templates_without_tools():
    messages = [AIMessage("Let me look.", tool_calls=[CALL, {**CALL, "id": "call_2", "args": {"city": "Rome"}}])]
    assert to_chat_messages(messages, inline_tool_calls=True) == [
        {"role": "assistant", "content": 'Let me look.\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                                         '{"name": "get_weather", "arguments": {"city": "Rome"}}'},
    ]


def test_list_content_keeps_text_blocks_only():
    content = [{"type": "text", "text": "some "}, "text",
               {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}]
    assert content_text(content) == "some text"
    with pytest.raises(ValueError, match="text content only; got a 'image' content block"):
        content_text([{"type": "image", "url": "https://example.com/cat.png"}])


def test_consecutive_same_roles_are_merged_but_tool_results_are_not():
    messages = [SystemMessage("A."), SystemMessage("B."), HumanMessage("1"), HumanMessage("2"),
                AIMessage("", tool_calls=[CALL]), AIMessage("", tool_calls=[{**CALL, "id": "call_2"}]),
                ToolMessage("x", tool_call_id="call_1"), ToolMessage("y", tool_call_id="call_2")]
    out = to_chat_messages(messages)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "tool", "tool"]
    assert out[0]["content"] == "A.\n\nB." and out[1]["content"] == "1\n\n2"
    assert [c["id"] for c in out[2]["tool_calls"]] == ["call_1", "call_2"]
    assert merge_consecutive([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": ""}]) == [
        {"role": "assistant", "content": "a"}]


def test_system_extras_go_after_the_system_prompt():
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert add_to_system(with_system, ["TOOLS", "", "DOCS"]) == [
        {"role": "system", "content": "Be brief.\n\nTOOLS\n\nDOCS"}, {"role": "user", "content": "Hi"}]
    assert add_to_system([{"role": "user", "content": "Hi"}], ["DOCS"]) == [
        {"role": "system", "content": "DOCS"}, {"role": "user", "content": "Hi"}]
    assert add_to_system(with_system, []) is with_system


def test_legacy_and_generic_messages():
    assert to_chat_messages([ChatMessage("x", role="developer"), FunctionMessage("42", name="calc")]) == [
        {"role": "developer", "content": "x"}, {"role": "tool", "content": "42", "name": "calc"}]
