"""invoke / ainvoke skip LangChain's run machinery only when nothing would observe it, and return what it returns."""
from __future__ import annotations

import re
import uuid

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.globals import set_llm_cache
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.rate_limiters import InMemoryRateLimiter
from langchain_core.tracers.context import tracing_v2_enabled

from braid_langchain import ChatBraid
from braid_langchain.direct_calls import direct_config

from tests.langchain.conftest import GREEDY

MESSAGES = [SystemMessage("You are a terse assistant."), HumanMessage("Name one colour of the sky.")]
RUN_ID = re.compile(r"^lc_run--[0-9a-f-]{36}-0$")


class Recorder(BaseCallbackHandler):
    def __init__(self):
        self.events = []

    def on_chat_model_start(self, *args, **kwargs):
        self.events.append("start")

    def on_llm_end(self, *args, **kwargs):
        self.events.append("end")


def comparable(message) -> dict:
    return message.model_dump(exclude={"id"})


@pytest.fixture
def no_langchain_path(monkeypatch):
    """Fails a call that goes through LangChain's generate machinery."""
    def refuse(*args, **kwargs):
        raise AssertionError("the call went through LangChain's run machinery")

    monkeypatch.setattr(BaseChatModel, "generate_prompt", refuse)
    monkeypatch.setattr(BaseChatModel, "agenerate_prompt", refuse)


def test_invoke_without_observers_returns_what_langchains_path_returns(chat, monkeypatch):
    chat.invoke(MESSAGES)  # the prompt cached, so both calls below read the same part of it from the cache
    recorder = Recorder()
    full = chat.invoke(MESSAGES, config={"callbacks": [recorder]})
    assert recorder.events == ["start", "end"]
    with monkeypatch.context() as m:
        m.setattr(BaseChatModel, "generate_prompt", lambda *a, **k: pytest.fail("took LangChain's path"))
        direct = chat.invoke(MESSAGES)
    assert comparable(direct) == comparable(full)
    assert RUN_ID.match(direct.id) and RUN_ID.match(full.id) and direct.id != full.id


async def test_ainvoke_without_observers_returns_what_langchains_path_returns(chat, monkeypatch):
    await chat.ainvoke(MESSAGES)
    recorder = Recorder()
    full = await chat.ainvoke(MESSAGES, config={"callbacks": [recorder]})
    assert recorder.events == ["start", "end"]
    with monkeypatch.context() as m:
        m.setattr(BaseChatModel, "agenerate_prompt", lambda *a, **k: pytest.fail("took LangChain's path"))
        direct = await chat.ainvoke(MESSAGES)
    assert comparable(direct) == comparable(full)
    assert RUN_ID.match(direct.id)


def test_the_run_id_of_the_config_names_the_message_on_both_paths(chat):
    run_id = uuid.uuid4()
    direct = chat.invoke(MESSAGES, config={"run_id": run_id})
    full = chat.invoke(MESSAGES, config={"run_id": run_id, "callbacks": [Recorder()]})
    assert direct.id == full.id == f"lc_run--{run_id}-0"


def test_structured_output_goes_direct_and_parses(chat, no_langchain_path):
    schema = {"title": "Colour", "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    reply = chat.with_structured_output(schema).invoke(MESSAGES)  # passes ls_structured_output_format along
    assert isinstance(reply, dict) and isinstance(reply["name"], str)


@pytest.mark.parametrize("case", ["config callbacks", "model callbacks", "verbose", "tracing", "rate limiter",
                                  "stream argument", "streaming model", "global cache", "model cache", "plain"])
def test_only_unobserved_calls_go_direct(case, monkeypatch):
    settings, config, kwargs = dict(GREEDY), {}, {}
    if case == "config callbacks":
        config["callbacks"] = [Recorder()]
    elif case == "model callbacks":
        settings["callbacks"] = [Recorder()]
    elif case == "verbose":
        settings["verbose"] = True
    elif case == "tracing":
        monkeypatch.setenv("LANGSMITH_API_KEY", "test")  # a tracer is configured; nothing is sent by this test
        with tracing_v2_enabled(project_name="test"):
            assert direct_config(ChatBraid(**settings), config, kwargs) is None
        return
    elif case == "rate limiter":
        settings["rate_limiter"] = InMemoryRateLimiter(requests_per_second=100)
    elif case == "stream argument":
        kwargs["stream"] = True
    elif case == "streaming model":
        settings["streaming"] = True
    elif case == "global cache":
        set_llm_cache(InMemoryCache())  # reset below
    elif case == "model cache":
        settings["cache"] = InMemoryCache()
    try:
        assert (direct_config(ChatBraid(**settings), config, kwargs) is not None) == (case == "plain")
    finally:
        set_llm_cache(None)
