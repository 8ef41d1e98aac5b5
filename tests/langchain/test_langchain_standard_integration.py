"""LangChain's standard integration suite against the embedded SmolLM2-135M-Instruct on CPU (greedy, short replies).

The xfails below are about what a 135M-parameter model writes, not about ChatBraid: constrained decoding keeps
every reply valid JSON, but it cannot make a model this small choose sensible content.
"""
from __future__ import annotations

import json

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_core.utils.json import parse_partial_json
from langchain_tests.integration_tests import ChatModelIntegrationTests

from braid_langchain import ChatBraid
from tests.langchain.conftest import GREEDY, ChatBraidCapabilities

REPETITION_LOOP = (
    "SmolLM2-135M at temperature 0 loops inside the first JSON string ('I'm a cat, I'm a cat, ...') until "
    "max_tokens, so the object never reaches its second field (the JSON is valid up to the cut, which ChatBraid "
    "reports rather than return a part of the object)")
MISSING_KEY = (
    "in JSON mode only the syntax is constrained; SmolLM2-135M, asked for 'setup' and 'punchline', writes only "
    "'setup' and closes the object")
NO_UNFORCED_CALL = (
    "with tool_choice left to the model, SmolLM2-135M answers in prose instead of calling the tool "
    "(forced calls, tool_choice='any', pass in test_tool_calling and test_tool_choice)")


class TestChatBraidIntegration(ChatBraidCapabilities, ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict:
        return {**GREEDY, "max_tokens": 64}

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supported_usage_metadata_details(self) -> dict:
        details = ["cache_read_input", "cache_creation_input"]
        return {"invoke": details, "stream": details}

    def invoke_with_cache_read_input(self, *, stream: bool = False):
        return _second_call_with_same_system_prompt(stream)

    def invoke_with_cache_creation_input(self, *, stream: bool = False):
        return _second_call_with_same_system_prompt(stream)


def _cut_inside_the_object(replies) -> bool:
    """REPETITION_LOOP: the reply ran to max_tokens ("length") and is a valid JSON prefix of the Joke object that
    never reached its second field."""
    last = replies[-1]
    partial = parse_partial_json(last.content) if last.content.startswith("{") else None
    return (last.response_metadata["finish_reason"] == "length" and isinstance(partial, dict)
            and "punchline" not in partial)


def _complete_object_without_punchline(replies) -> bool:
    """MISSING_KEY: a complete JSON object that ended normally, with 'setup' and without 'punchline'."""
    last = replies[-1]
    try:
        value = json.loads(last.content)
    except ValueError:
        return False
    return (last.response_metadata["finish_reason"] == "stop" and isinstance(value, dict) and "setup" in value
            and "punchline" not in value)


def _prose_instead_of_a_call(replies) -> bool:
    """NO_UNFORCED_CALL: the first reply is text with no tool call, valid or not."""
    first = replies[0]
    return bool(first.content) and not first.tool_calls and not first.invalid_tool_calls


# Standard tests expected to fail, by test id: why, the exception, and what the replies must show (checked after
# the test, so a different failure is reported rather than hidden). Applied by the fixture below so that the other
# parametrisations of the same test still have to pass (and the standard tests stay un-overridden); strict, so a
# fix is noticed.
EXPECTED_FAILURES = {
    "test_structured_output[pydantic]": (REPETITION_LOOP, OutputParserException, _cut_inside_the_object),
    "test_structured_output_async[pydantic]": (REPETITION_LOOP, OutputParserException, _cut_inside_the_object),
    "test_structured_output_pydantic_2_v1": (REPETITION_LOOP, OutputParserException, _cut_inside_the_object),
    "test_structured_output[typeddict]": (REPETITION_LOOP, OutputParserException, _cut_inside_the_object),
    "test_structured_output[json_schema]": (REPETITION_LOOP, OutputParserException, _cut_inside_the_object),
    "test_structured_output_async[typeddict]": (REPETITION_LOOP, OutputParserException, _cut_inside_the_object),
    "test_structured_output_async[json_schema]": (REPETITION_LOOP, OutputParserException, _cut_inside_the_object),
    "test_structured_output_optional_param": (REPETITION_LOOP, OutputParserException, _cut_inside_the_object),
    "test_json_mode": (MISSING_KEY, OutputParserException, _complete_object_without_punchline),
    "test_agent_loop[model0]": (NO_UNFORCED_CALL, AssertionError, _prose_instead_of_a_call),
    "test_agent_loop[model1]": (NO_UNFORCED_CALL, AssertionError, _prose_instead_of_a_call),
}


@pytest.fixture(autouse=True)
def _expected_failures(request, monkeypatch):
    if request.node.name not in EXPECTED_FAILURES:
        yield
        return
    reason, raises, why = EXPECTED_FAILURES[request.node.name]
    request.applymarker(pytest.mark.xfail(reason=reason, raises=raises, strict=True))
    replies = []
    generate, agenerate = ChatBraid._generate, ChatBraid._agenerate

    def recorded(self, *args, **kwargs):
        result = generate(self, *args, **kwargs)
        replies.append(result.generations[0].message)
        return result

    async def arecorded(self, *args, **kwargs):
        result = await agenerate(self, *args, **kwargs)
        replies.append(result.generations[0].message)
        return result

    monkeypatch.setattr(ChatBraid, "_generate", recorded)
    monkeypatch.setattr(ChatBraid, "_agenerate", arecorded)
    yield
    assert replies and why(replies), f"{request.node.name} failed for another reason than: {why.__doc__}; " \
        f"replies: {[(m.content, m.tool_calls, m.response_metadata.get('finish_reason')) for m in replies]}"


def _second_call_with_same_system_prompt(stream: bool):
    """The second of two calls sharing a long system prompt: its prefix is read from the KV cache."""
    from langchain_core.messages import HumanMessage, SystemMessage

    model = ChatBraid(**GREEDY, max_tokens=4)
    system = SystemMessage("You answer questions about the solar system. " * 8)
    model.invoke([system, HumanMessage("Which planet is largest?")])
    messages = [system, HumanMessage("Which planet is smallest?")]
    if not stream:
        return model.invoke(messages)
    full = None
    for chunk in model.stream(messages):
        full = chunk if full is None else full + chunk
    return full
