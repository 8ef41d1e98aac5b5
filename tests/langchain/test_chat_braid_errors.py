"""Bad input gives a clear error naming the problem: at construction for parameters, on first use for the model."""
from __future__ import annotations

import asyncio

import pytest
from langchain_core.messages import HumanMessage
from pydantic import ValidationError

from braid_langchain import ChatBraid, engines
from braidinfer.errors import InvalidRequestError, ModelNotFoundError
from tests.langchain.conftest import ENGINE

BAD_SCHEMA_TOOL = {"type": "function", "function": {
    "name": "lookup", "description": "Look a code up.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string", "pattern": "(unclosed"}}}}}


def test_unknown_model_path_fails_on_first_use_with_the_engines_error():
    model = ChatBraid(model="/no/such/model.gguf", device="cpu")  # construction never loads
    assert not engines.is_loaded("/no/such/model.gguf", "cpu")
    with pytest.raises(ModelNotFoundError, match="/no/such/model.gguf"):
        model.invoke("Hi")


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -1.0, "temperature' must be a finite number >= 0"),
    ("top_p", 0.0, r"top_p' must be a finite number in \(0, 1\]"),
    ("top_k", -5, "top_k' must be an integer"),
    ("min_p", 2.0, r"min_p' must be a finite number in \[0, 1\]"),
    ("max_tokens", 0, "max_tokens' must be an integer >= 1"),
    ("repetition_penalty", 0.0, "repetition_penalty' must be a finite number > 0"),
    ("frequency_penalty", 5.0, r"frequency_penalty' must be a finite number in \[-2, 2\]"),
    ("device", "gpu", "device must be 'cpu', 'cuda' or 'cuda:N'"),
    ("dtype", "float64", "dtype"),
    ("temprature", 0.5, "temprature\n  Extra inputs are not permitted"),
])
def test_invalid_parameters_fail_at_construction(field, value, message):
    with pytest.raises(ValidationError, match=message):
        ChatBraid(**{**ENGINE, field: value})


@pytest.mark.parametrize("budget", [0, -3, 2.5])
def test_a_bad_max_reasoning_tokens_call_argument_is_refused_like_the_field(chat, budget):
    with pytest.raises(ValidationError):
        ChatBraid(max_reasoning_tokens=budget)
    with pytest.raises(ValueError, match=f"max_reasoning_tokens must be an int >= 1 \\(or None\\), got {budget!r}"):
        chat.invoke("Hi", max_reasoning_tokens=budget)


def test_invalid_call_arguments(chat):
    with pytest.raises(ValueError, match=r"unknown call argument\(s\) \['temprature'\]"):
        chat.invoke("Hi", temprature=0)
    with pytest.raises(InvalidRequestError, match="temperature"):
        chat.invoke("Hi", temperature=-2.0)
    with pytest.raises(ValueError, match="names no bound tool"):
        chat.bind_tools([BAD_SCHEMA_TOOL], tool_choice="search")
    with pytest.raises(ValueError, match="text content only; got a 'image' content block"):
        chat.invoke([HumanMessage([{"type": "image", "url": "https://example.com/cat.png"}])])


def test_tool_schema_that_cannot_be_compiled_names_the_tool(chat):
    model = chat.bind_tools([BAD_SCHEMA_TOOL], tool_choice="any")
    with pytest.raises(InvalidRequestError, match=r"tool\(s\) \['lookup'\] cannot be used.*parenthesis"):
        model.invoke("Look up code 7.")

    async def run():
        return await model.ainvoke("Look up code 7.")

    with pytest.raises(InvalidRequestError, match=r"tool\(s\) \['lookup'\]"):
        asyncio.run(run())


def test_required_tool_call_and_another_constraint_conflict(chat):
    from braidinfer.guided import GuidedDecoding

    model = chat.bind_tools([BAD_SCHEMA_TOOL], tool_choice="any").bind(guided=GuidedDecoding(json_object=True))
    with pytest.raises(ValueError, match="cannot be combined"):
        model.invoke("Hi")
