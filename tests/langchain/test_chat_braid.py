"""ChatBraid on the embedded model: usage in streams, prefix reuse across turns and documents, callbacks, stop,
forced tool calls and structured output."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessageChunk, HumanMessage, SystemMessage
from langchain_core.tools import tool
from pydantic import BaseModel

from braid_langchain import ChatBraid, engines, render_documents
from braid_langchain.tools import to_openai_tools, tool_prompt
from braidinfer import SamplingParams
from tests.langchain.conftest import ENGINE

SYSTEM = SystemMessage("You are a helpful assistant who answers briefly and kindly, in plain words.")


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return "sunny"


def page_size() -> int:
    return engines.get_engine(ENGINE["model"], ENGINE["device"]).config.page_size


def test_exactly_one_streamed_chunk_carries_usage(chat):
    chunks = list(chat.stream([SYSTEM, HumanMessage("Say hello.")]))
    with_usage = [c for c in chunks if c.usage_metadata]
    assert len(with_usage) == 1 and with_usage[0] is chunks[-1] and chunks[-1].chunk_position == "last"
    usage = with_usage[0].usage_metadata
    details = usage["input_token_details"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert details["cache_read"] + details["cache_creation"] == usage["input_tokens"]
    assert chunks[-1].response_metadata == {"model_name": "SmolLM2-135M-Instruct", "model_provider": "braid",
                                            "finish_reason": chunks[-1].response_metadata["finish_reason"]}


def test_async_stream_has_one_usage_chunk_too(chat):
    async def run():
        return [c async for c in chat.astream("Say hello.")]

    chunks = asyncio.run(run())
    assert sum(1 for c in chunks if c.usage_metadata) == 1 and chunks[-1].usage_metadata


def test_cache_read_grows_across_turns_and_reuses_the_answers(chat):
    history, reads, previous_total = [SYSTEM], [], 0
    for question in ["What is the capital of France?", "And of Italy?", "Which of the two is larger?"]:
        history.append(HumanMessage(question))
        reply = chat.invoke(history)
        read = reply.usage_metadata["input_token_details"]["cache_read"]
        # Every full page of the previous prompt *and its answer* is served from the cache.
        assert read >= previous_total // page_size() * page_size()
        reads.append(read)
        previous_total = reply.usage_metadata["total_tokens"]
        history.append(reply)
    assert 0 < reads[1] < reads[2]


def test_instances_share_one_engine_and_its_cache(chat):
    other = ChatBraid(**ENGINE, temperature=0.5, seed=1, max_tokens=4)  # constructing loads nothing new
    messages = [SystemMessage("You are a terse assistant for questions about trains. " * 4), HumanMessage("Hi")]
    chat.invoke(messages, max_tokens=4)
    assert other.invoke(messages).usage_metadata["input_token_details"]["cache_read"] > 0


def test_callbacks_see_every_token(chat):
    class Recorder(BaseCallbackHandler):
        def __init__(self):
            self.tokens = []

        def on_llm_new_token(self, token, **kwargs):
            self.tokens.append(token)

    recorder = Recorder()
    reply = chat.invoke("Count from one to five.", config={"callbacks": [recorder]})
    assert len(recorder.tokens) > 1 and "".join(recorder.tokens) == reply.content


def test_stop_strings_end_the_reply(chat):
    reply = chat.invoke("Count from 1 to 10, separated by commas.", stop=[","])
    assert "," not in reply.content and reply.response_metadata["finish_reason"] == "stop"
    assert chat.invoke("Write a long story.", max_tokens=3).usage_metadata["output_tokens"] == 3


def test_documents_are_a_reused_prefix(chat):
    docs = [Document("The Braid engine keeps KV pages of shared prompts.", metadata={"source": "braid.md"}),
            Document("Paris has about two million inhabitants.", metadata={"source": "paris.md"})]
    chat.invoke([SYSTEM, HumanMessage("How many people live in Paris?")], documents=docs)
    second = chat.invoke([SYSTEM, HumanMessage("What does Braid keep?")], documents=list(reversed(docs)))
    system_turn = {"role": "system", "content": f"{SYSTEM.content}\n\n{render_documents(docs)}"}
    engine = engines.get_engine(ENGINE["model"], ENGINE["device"])
    shared = len(engine.apply_chat_template([system_turn], add_generation_prompt=False))
    assert second.usage_metadata["input_token_details"]["cache_read"] >= shared // page_size() * page_size()


def test_forced_tool_call_streams_as_tool_call_chunks(chat):
    model = chat.bind_tools([get_weather], tool_choice="get_weather")
    chunks = list(model.stream("What is the weather in Paris?"))
    assert any(c.tool_call_chunks for c in chunks)
    full = chunks[0]
    for c in chunks[1:]:
        full += c
    assert isinstance(full, AIMessageChunk) and full.content == ""
    assert [(tc["name"], sorted(tc["args"])) for tc in full.tool_calls] == [("get_weather", ["city"])]
    assert full.tool_calls[0]["id"].startswith("call_")


def test_tool_result_conversation_continues(chat):
    model = chat.bind_tools([get_weather])
    call = model.bind(tool_choice="any").invoke("What is the weather in Paris?")
    result = get_weather.invoke(call.tool_calls[0])
    reply = model.invoke([HumanMessage("What is the weather in Paris?"), call, result])
    # Reference: the same conversation written by hand in the format of the tool prompt (SmolLM2's template has no
    # tool support), generated greedily by the engine itself.
    engine = engines.get_engine(ENGINE["model"], ENGINE["device"])
    by_hand = [{"role": "system", "content": tool_prompt(to_openai_tools([get_weather]))},
               {"role": "user", "content": "What is the weather in Paris?"},
               {"role": "assistant", "content": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
               {"role": "tool", "content": "sunny", "tool_call_id": call.tool_calls[0]["id"]}]
    expected = engine.generate([engine.apply_chat_template(by_hand)], SamplingParams(temperature=0, max_tokens=32))
    assert reply.content == expected[0].text and "sunny" in reply.content  # the reply reads the tool's result
    assert reply.tool_calls == [] and reply.response_metadata["finish_reason"] == "stop"


def test_a_forced_call_cut_by_max_tokens_says_so(chat):
    model = chat.bind_tools([get_weather], tool_choice="get_weather")
    reply = model.invoke("What is the weather in Paris?", max_tokens=5)
    assert reply.tool_calls == [] and reply.response_metadata["finish_reason"] == "length"
    assert "cut by max_tokens" in reply.invalid_tool_calls[0]["error"]
    with pytest.raises(OutputParserException, match="cut by max_tokens"):
        chat.with_structured_output(Person, method="function_calling").invoke("Invent a person.", max_tokens=5)


class Person(BaseModel):
    name: str
    age: int


def test_structured_output_is_always_valid_json(chat):
    person = chat.with_structured_output(Person).invoke("Invent a person.")
    assert isinstance(person, Person)
    as_dict = chat.with_structured_output(Person.model_json_schema()).invoke("Invent a person.")
    assert set(as_dict) == {"name", "age"}
    raw = chat.with_structured_output(Person, method="json_mode", include_raw=True).invoke("Describe a person.")
    assert isinstance(json.loads(raw["raw"].content), dict)
    assert set(raw) == {"raw", "parsed", "parsing_error"}


@pytest.mark.parametrize("schema", [int, list, dict])
@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_a_built_in_type_as_schema_is_refused_with_a_way_out(chat, schema, method):
    """Before, int failed inside inspect ("no signature found for builtin type") and list passed as a tool named
    "list" with its constructor's arguments."""
    with pytest.raises(ValueError, match=rf"built-in type {schema.__name__}; wrap it in a model"):
        chat.with_structured_output(schema, method=method)


def test_a_model_defined_outside_a_module_is_not_taken_for_a_built_in(chat):
    """A class made by exec() without __name__ in its globals has the __module__ "builtins": still a model."""
    scope = {"BaseModel": BaseModel}
    exec("class Answer(BaseModel):\n    value: int", scope)
    assert scope["Answer"].__module__ == "builtins"
    chat.with_structured_output(scope["Answer"])  # builds, as for any pydantic model


@pytest.mark.parametrize("method", ["json_schema", "json_mode"])
def test_structured_output_cut_by_max_tokens_raises_instead_of_parsing_a_part(chat, method):
    short = chat.model_copy(update={"max_tokens": 5})
    with pytest.raises(OutputParserException, match="not complete JSON.*'length'.*raise max_tokens"):
        short.with_structured_output(Person, method=method).invoke("Invent a person.")
    raw = short.with_structured_output(Person, method=method, include_raw=True).invoke("Invent a person.")
    assert raw["parsed"] is None and isinstance(raw["parsing_error"], OutputParserException)
    assert raw["raw"].response_metadata["finish_reason"] == "length"


def test_leaving_a_stream_early_cancels_the_request(chat):
    engine = engines.get_engine(ENGINE["model"], ENGINE["device"])

    def pages_in_use_after(consume) -> int:
        consume()
        for _ in range(50):  # the cancel reaches the engine thread between steps
            if engine.cache_stats()["in_use"] == 0:
                break
            time.sleep(0.02)
        return engine.cache_stats()["in_use"]

    def sync_break():
        for _ in chat.stream("Write a very long story about a dragon.", max_tokens=200):
            break

    async def async_break():
        async for _ in chat.astream("Write a very long story about a knight.", max_tokens=200):
            break

    assert pages_in_use_after(sync_break) == 0
    assert pages_in_use_after(lambda: asyncio.run(async_break())) == 0
