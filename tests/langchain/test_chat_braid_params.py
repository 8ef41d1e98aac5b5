"""ChatBraid's standard parameters and OpenAI-style arguments: timeout, max_retries (faults injected as in
tests/reliability/test_faults.py), engine settings, response_format (also through `create_agent`), tool kwargs,
serialization."""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from contextlib import aclosing, closing

import pytest
import torch
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.load import dumps, loads
from langchain_core.messages import HumanMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool
from langchain_core.utils.json import parse_partial_json
from pydantic import BaseModel

from braid_langchain import ChatBraid, engines, retries
from braidinfer.errors import EngineDeadError, InvalidRequestError, RequestFailedError, RequestTimeoutError
from tests.conftest import build_tiny_model
from tests.support.engines import idle_problems

TINY = {"device": "cpu", "dtype": "float32", "temperature": 0.0, "max_tokens": 8}


class Fatal(BaseException):
    """Kills the engine loop itself (not an Exception, so the step's own error handling does not catch it)."""


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return "sunny"


class Weather(BaseModel):
    city: str
    sky: str


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smollm_tokenizer) -> str:
    """A directory holding a tiny random Llama with SmolLM2's tokenizer and chat template."""
    path = tmp_path_factory.mktemp("tiny-llama-params")
    build_tiny_model("llama", path, smollm_tokenizer, seed=11)
    return str(path)


@pytest.fixture
def tiny_chat(tiny_llama):
    """A ChatBraid on the tiny random model with an engine of its own (closed after the test)."""
    settings = {"num_kv_pages": 1024, "page_size": 4, "max_model_len": 256}
    yield ChatBraid(model=tiny_llama, **TINY, engine_kwargs=settings)
    engines.close_engine(tiny_llama, "cpu", "float32", **settings)


def _engine(chat: ChatBraid):
    return engines.get_engine(chat.model, chat.device, chat.dtype, **chat.engine_kwargs)


def _slow_steps(monkeypatch, llm, seconds: float) -> None:
    step = llm.engine.step

    def slow():
        threading.Event().wait(seconds)
        step()

    monkeypatch.setattr(llm.engine, "step", slow)


# --- engine settings ---------------------------------------------------------------------------------------------
def test_engine_kwargs_reach_the_engine_and_engines_are_shared_per_configuration(tiny_chat, tiny_llama):
    engine = _engine(tiny_chat)
    assert (engine.config.num_kv_pages, engine.config.page_size, engine.config.max_model_len) == (1024, 4, 256)
    same = ChatBraid(model=tiny_llama, **TINY, engine_kwargs=dict(reversed(tiny_chat.engine_kwargs.items())))
    assert _engine(same) is engine
    with pytest.raises(ValueError, match="max_num_seqs"):
        ChatBraid(model=tiny_llama, **TINY, engine_kwargs={"max_num_seqs": 0})
    with pytest.raises(ValueError, match="engine_kwargs may not set \\['dtype'\\]"):
        ChatBraid(model=tiny_llama, **TINY, engine_kwargs={"dtype": "float16"})


def test_equivalent_devices_and_dtypes_share_an_engine_key(tiny_llama):
    on = "cuda:0" if torch.cuda.is_available() else "cpu"  # what device None picks (EngineConfig.device)
    auto = "bfloat16" if on.startswith("cuda") else "float32"  # what dtype "auto" stands for there
    key = engines.engine_key(tiny_llama, on, auto, page_size=4)
    assert engines.engine_key(tiny_llama, None, page_size=4) == key
    assert engines.engine_key(tiny_llama, on, "auto", page_size=4) == key
    assert engines.engine_key(tiny_llama, "cuda", "float16") == engines.engine_key(tiny_llama, "cuda:0", "float16")
    assert engines.engine_key(tiny_llama, on, "float16") != engines.engine_key(tiny_llama, on, "float32")


def test_one_model_directory_written_two_ways_is_one_engine_key(tiny_llama, tmp_path, monkeypatch):
    """A relative path, the absolute one and one through a symlink open the same files: one engine, not three loads
    of the same weights (before, the key was the string as written)."""
    monkeypatch.chdir(os.path.dirname(tiny_llama))
    link = tmp_path / "link"
    link.symlink_to(tiny_llama)
    key = engines.engine_key(tiny_llama, "cpu")
    assert engines.engine_key(os.path.basename(tiny_llama), "cpu") == key
    assert engines.engine_key(os.path.join(".", os.path.basename(tiny_llama), ""), "cpu") == key
    assert engines.engine_key(str(link), "cpu") == key
    link.unlink()
    link.symlink_to(tmp_path)  # re-pointed after use: the path still names the engine it loaded
    assert engines.engine_key(str(link), "cpu") == key
    assert engines.engine_key("org/not-a-local-dir", "cpu")[0] == "org/not-a-local-dir"  # a hub id stays as given


@pytest.mark.skipif(torch.cuda.is_available(), reason="device None means CUDA here")
def test_default_device_and_dtype_reuse_the_engine_of_their_concrete_values(tiny_chat, tiny_llama):
    engine = _engine(tiny_chat)  # device "cpu", dtype "float32"
    assert _engine(ChatBraid(model=tiny_llama, engine_kwargs=tiny_chat.engine_kwargs)) is engine
    assert engine.engine.dtype == torch.float32 and engine.engine.device == torch.device("cpu")


# --- timeout -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["invoke", "stream", "ainvoke"])
def test_timeout_aborts_the_request_and_frees_its_pages(tiny_chat, monkeypatch, how):
    llm = _engine(tiny_chat)
    expected = tiny_chat.invoke("Hello there").content
    _slow_steps(monkeypatch, llm, 0.2)  # 8 tokens take 1.6 s now
    chat = tiny_chat.model_copy(update={"timeout": 0.5, "max_retries": 2})
    with pytest.raises(TimeoutError) as caught:
        if how == "invoke":
            chat.invoke("Hello there")
        elif how == "stream":
            list(chat.stream("Hello there"))
        else:
            asyncio.run(chat.ainvoke("Hello there"))
    assert isinstance(caught.value, RequestTimeoutError)
    monkeypatch.undo()
    assert not idle_problems(llm)  # aborted, nothing left running or holding pages (pins aside)
    assert tiny_chat.invoke("Hello there").content == expected  # and the engine serves on


class Tokens(BaseCallbackHandler):
    """Collects the tokens LangChain's callbacks see."""

    def __init__(self):
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs) -> None:
        self.tokens.append(token)


CALLS = ["invoke", "invoke with callbacks", "stream", "ainvoke", "ainvoke with callbacks", "astream"]


def _call(chat: ChatBraid, how: str, text: str) -> str:
    """`text` sent through one of ChatBraid's entry points (CALLS); returns the reply's content."""
    config = {"callbacks": [Tokens()]} if how.endswith("with callbacks") else None

    async def astream() -> str:
        return "".join([chunk.content async for chunk in chat.astream(text)])

    if how.startswith("invoke"):
        return chat.invoke(text, config=config).content
    if how.startswith("ainvoke"):
        return asyncio.run(chat.ainvoke(text, config=config)).content
    return "".join(chunk.content for chunk in chat.stream(text)) if how == "stream" else asyncio.run(astream())


def _pin_deadlines(monkeypatch, before=lambda deadline: None) -> list[float | None]:
    """Records the deadline that each attempt pins its prefixes under (every attempt pins first, sync or async),
    running `before(deadline)` first; returns the record."""
    deadlines, pin, apin = [], ChatBraid._pin, ChatBraid._apin

    def recorded(request, builder, deadline):
        deadlines.append(deadline)
        before(deadline)
        pin(request, builder, deadline)

    async def arecorded(request, builder, deadline):
        deadlines.append(deadline)
        before(deadline)
        await apin(request, builder, deadline)

    monkeypatch.setattr(ChatBraid, "_pin", staticmethod(recorded))
    monkeypatch.setattr(ChatBraid, "_apin", staticmethod(arecorded))
    return deadlines


@pytest.mark.parametrize("how", CALLS)
def test_the_deadline_starts_once_the_engine_is_loaded(tiny_chat, monkeypatch, how):
    expected = tiny_chat.invoke("Hello there").content
    get_engine, loaded_at = engines.get_engine, []

    def slow_load(*args, **kwargs):  # a cold engine: loading takes a while
        engine = get_engine(*args, **kwargs)
        threading.Event().wait(0.05)
        loaded_at.append(time.monotonic())
        return engine

    monkeypatch.setattr(engines, "get_engine", slow_load)
    deadlines = _pin_deadlines(monkeypatch)
    chat = tiny_chat.model_copy(update={"timeout": 60.0})
    assert _call(chat, how, "Hello there") == expected
    assert len(deadlines) == 1 and deadlines[0] >= loaded_at[0] + 60.0


@pytest.mark.parametrize("how", CALLS)
def test_retries_keep_the_calls_deadline(tiny_chat, monkeypatch, how):
    expected = tiny_chat.invoke("Hello there").content

    def fail_twice(deadline):
        if len(deadlines) <= 2:
            raise EngineDeadError("injected transient failure") from Fatal("a dead loop")

    deadlines = _pin_deadlines(monkeypatch, fail_twice)
    chat = tiny_chat.model_copy(update={"timeout": 60.0, "max_retries": 2})
    assert _call(chat, how, "Hello there") == expected
    assert len(deadlines) == 3 and deadlines[0] is not None and deadlines[0] == deadlines[1] == deadlines[2]


@pytest.mark.parametrize("how", CALLS)
def test_no_retry_starts_past_the_calls_deadline(tiny_chat, monkeypatch, how):
    def fail_past_the_deadline(deadline):
        while time.monotonic() < deadline:
            threading.Event().wait(deadline - time.monotonic())
        raise EngineDeadError("injected transient failure") from Fatal("a dead loop")

    deadlines = _pin_deadlines(monkeypatch, fail_past_the_deadline)
    chat = tiny_chat.model_copy(update={"timeout": 0.05, "max_retries": 2})
    with pytest.raises(RequestTimeoutError):
        _call(chat, how, "Hello there")
    assert len(deadlines) == 1


def test_a_forked_child_runs_work_under_a_deadline():
    hang_guard_s = 60  # far above the child's normal run (milliseconds); reached only when the work never runs
    assert retries.call_within(time.monotonic() + hang_guard_s, lambda: "parent") == "parent"  # the pool is up
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what call_within gave, then leave without pytest's teardown
        try:
            os.write(write, retries.call_within(time.monotonic() + hang_guard_s, lambda: "child").encode())
        except BaseException as e:
            os.write(write, type(e).__name__.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as reader:
        reported = reader.read()
    os.waitpid(pid, 0)
    assert reported == "child"


def test_work_still_queued_at_its_deadline_never_runs():
    """A pin queued behind the pool's busy workers and given up on never runs (it ran late, pinning a chunk that
    nobody would use or release); one that started finishes."""
    release, started, ran = threading.Event(), [], []

    def busy():
        started.append(1)
        release.wait()

    hold = [retries._pool().submit(busy) for _ in range(4)]  # every worker
    with pytest.raises(RequestTimeoutError):
        retries.call_within(time.monotonic() + 0.05, lambda: ran.append("late"))
    release.set()
    for future in hold:
        future.result()
    assert retries.call_within(time.monotonic() + 60, lambda: "after") == "after"  # the workers are free again
    assert len(started) == 4 and ran == []

# --- max_retries -------------------------------------------------------------------------------------------------
def _oom_first_runs(monkeypatch, llm, times: int) -> list[int]:
    """The first `times` forwards raise CUDA's out-of-memory error; returns the call counter."""
    run, calls = llm.engine.runner.run, [0]

    def flaky(*args, **kwargs):
        calls[0] += 1
        if calls[0] <= times:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return run(*args, **kwargs)

    monkeypatch.setattr(llm.engine.runner, "run", flaky)
    return calls


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_request_failed_by_out_of_memory_is_retried(tiny_chat, monkeypatch, asynchronous):
    expected = tiny_chat.invoke("Hello there").content
    calls = _oom_first_runs(monkeypatch, _engine(tiny_chat), times=2)
    chat = tiny_chat.model_copy(update={"max_retries": 2})
    reply = asyncio.run(chat.ainvoke("Hello there")) if asynchronous else chat.invoke("Hello there")
    assert reply.content == expected and calls[0] > 2


def test_retries_stop_at_max_retries(tiny_chat, monkeypatch):
    _oom_first_runs(monkeypatch, _engine(tiny_chat), times=2)
    with pytest.raises(RequestFailedError, match="OutOfMemoryError"):
        tiny_chat.model_copy(update={"max_retries": 1}).invoke("Hello there")


def _oom_after_deltas(monkeypatch, llm, after: int) -> list[int]:
    """The engine's first streamed request fails with CUDA's out-of-memory error after `after` deltas (a transient
    failure); returns the counter of streamed requests."""
    stream, astream, calls = llm.stream_deltas, llm.astream_deltas, [0]

    def failure() -> RequestFailedError:
        error = RequestFailedError("step failed (injected)")
        error.__cause__ = torch.OutOfMemoryError("CUDA out of memory (injected)")
        return error

    def flaky(*args, **kwargs):
        calls[0] += 1
        with closing(stream(*args, **kwargs)) as deltas:
            for i, delta in enumerate(deltas):
                if calls[0] == 1 and i == after:
                    raise failure()
                yield delta

    async def aflaky(*args, **kwargs):
        calls[0] += 1
        async with aclosing(astream(*args, **kwargs)) as deltas:
            i = 0
            async for delta in deltas:
                if calls[0] == 1 and i == after:
                    raise failure()
                i += 1
                yield delta

    monkeypatch.setattr(llm, "stream_deltas", flaky)
    monkeypatch.setattr(llm, "astream_deltas", aflaky)
    return calls


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_failure_after_callbacks_saw_tokens_is_not_retried(tiny_chat, monkeypatch, asynchronous):
    expected = tiny_chat.invoke("Hello there").content
    assert len(tiny_chat.get_token_ids(expected)) > 2  # the failure below comes mid-reply
    calls = _oom_after_deltas(monkeypatch, _engine(tiny_chat), after=2)
    handler = Tokens()
    config = {"callbacks": [handler]}
    with pytest.raises(RequestFailedError, match="step failed"):
        if asynchronous:
            asyncio.run(tiny_chat.ainvoke("Hello there", config=config))
        else:
            tiny_chat.invoke("Hello there", config=config)
    seen = "".join(handler.tokens)
    assert calls[0] == 1 and seen and expected.startswith(seen)  # each token once, as the first attempt made it


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_failure_before_callbacks_saw_a_token_is_retried(tiny_chat, monkeypatch, asynchronous):
    expected = tiny_chat.invoke("Hello there").content
    calls = _oom_after_deltas(monkeypatch, _engine(tiny_chat), after=0)
    handler = Tokens()
    config = {"callbacks": [handler]}
    if asynchronous:
        reply = asyncio.run(tiny_chat.ainvoke("Hello there", config=config))
    else:
        reply = tiny_chat.invoke("Hello there", config=config)
    assert calls[0] == 2 and reply.content == "".join(handler.tokens) == expected


def test_a_dead_engine_is_replaced_and_the_call_retried(tiny_chat, monkeypatch):
    expected = tiny_chat.invoke("Hello there").content
    first = _engine(tiny_chat)

    def die():
        raise Fatal("injected loop fault")

    monkeypatch.setattr(first.engine, "step", die)
    with pytest.raises(EngineDeadError):
        tiny_chat.model_copy(update={"max_retries": 0}).invoke("Hello there")
    monkeypatch.undo()
    monkeypatch.setattr(_engine(tiny_chat).engine, "step", die)  # the fresh engine dies in the first attempt too
    second = _engine(tiny_chat)
    assert tiny_chat.invoke("Hello there").content == expected  # max_retries=2: a third engine answers
    assert _engine(tiny_chat) not in (first, second)


def test_a_call_on_an_engine_closed_meanwhile_is_not_retried(tiny_chat, monkeypatch):
    """Closing an engine is the user's decision: its calls fail, and no retry loads it again."""
    llm = _engine(tiny_chat)
    generate = llm.generate

    def closed_meanwhile(*args, **kwargs):
        llm.close()
        return generate(*args, **kwargs)

    monkeypatch.setattr(llm, "generate", closed_meanwhile)
    with pytest.raises(EngineDeadError, match="was closed"):
        tiny_chat.model_copy(update={"max_retries": 2}).invoke("Hello there")
    assert not engines.is_loaded(tiny_chat.model, tiny_chat.device, tiny_chat.dtype, **tiny_chat.engine_kwargs)


def test_invalid_requests_are_never_retried(tiny_chat, monkeypatch):
    llm = _engine(tiny_chat)
    make, calls = llm.engine.requests.sequence, [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return make(*args, **kwargs)

    monkeypatch.setattr(llm.engine.requests, "sequence", counted)
    with pytest.raises(InvalidRequestError, match="context"):
        tiny_chat.invoke("word " * 400)  # longer than max_model_len=256
    assert calls[0] == 1


@pytest.mark.parametrize("failures, max_retries, attempts, waits", [
    (0, 2, 1, []),  # the usual call: one attempt, no wait
    (2, 2, 3, [0.05, 0.1]),  # the waits of retries.aretrying: 0.05 s, then doubling
    (5, 3, 4, [0.05, 0.1, 0.2]),  # gives up after max_retries, raising the last error
    (5, 0, 1, []),
])
def test_async_retries_keep_tenacitys_attempts_and_waits(monkeypatch, failures, max_retries, attempts, waits):
    from braid_langchain import retries

    slept, calls, real_sleep = [], [0], asyncio.sleep

    async def sleep(seconds, *args):
        slept.append(round(seconds, 6))
        await real_sleep(0)

    async def flaky():
        calls[0] += 1
        if calls[0] <= failures:
            raise EngineDeadError(f"injected failure {calls[0]}") from Fatal("a dead loop")
        return "ok"

    monkeypatch.setattr(asyncio, "sleep", sleep)
    if failures < attempts:
        assert asyncio.run(retries.acall(max_retries, flaky)) == "ok"
    else:
        with pytest.raises(EngineDeadError, match=f"injected failure {attempts}"):
            asyncio.run(retries.acall(max_retries, flaky))
    assert calls[0] == attempts and slept == waits


def test_async_retries_never_retry_invalid_requests():
    from braid_langchain import retries

    calls = [0]

    async def invalid():
        calls[0] += 1
        raise InvalidRequestError("bad")

    with pytest.raises(InvalidRequestError):
        asyncio.run(retries.acall(3, invalid))
    assert calls[0] == 1


# --- response_format and tool kwargs -----------------------------------------------------------------------------
def test_response_format_constrains_the_reply(chat):
    schema_reply = chat.invoke("Weather in Paris, as JSON.", response_format=Weather, max_tokens=48)
    assert schema_reply.response_metadata["finish_reason"] == "stop"
    assert sorted(json.loads(schema_reply.content)) == ["city", "sky"]
    schema = Weather.model_json_schema()
    openai_style = {"type": "json_schema", "json_schema": {"name": "Weather", "schema": schema}}
    assert chat.invoke("Weather in Paris, as JSON.", response_format=openai_style, max_tokens=48).content == \
        chat.invoke("Weather in Paris, as JSON.", response_format=schema, max_tokens=48).content
    free = chat.invoke("Describe a cat.", max_tokens=16)
    constrained = chat.invoke("Describe a cat.", max_tokens=16, response_format={"type": "json_object"})
    assert not free.content.startswith("{")
    assert constrained.content.startswith("{") and isinstance(parse_partial_json(constrained.content), dict)
    with pytest.raises(ValueError, match="response_format type 'xml'"):
        chat.invoke("Hi", response_format={"type": "xml"})


def test_create_agent_with_a_structured_response(chat):
    agents = pytest.importorskip("langchain.agents")
    agent = agents.create_agent(chat.model_copy(update={"max_tokens": 48}), [], response_format=Weather)
    result = agent.invoke({"messages": [HumanMessage("What is the weather in Paris? Say the sky is clear.")]})
    assert isinstance(result["structured_response"], Weather)


def test_create_agent_with_tools_and_a_structured_response_gets_a_call_or_the_object(chat):
    """With tools and response_format the reply is constrained to a tool call or the response object: whichever
    the model picks, it parses."""
    model = chat.bind_tools([get_weather], response_format=Weather, parallel_tool_calls=False, strict=True)
    reply = model.invoke("What is the weather in Paris?", max_tokens=48)
    assert reply.response_metadata["finish_reason"] in ("tool_calls", "stop")
    if reply.tool_calls:
        assert reply.response_metadata["finish_reason"] == "tool_calls"
        assert [c["name"] for c in reply.tool_calls] == ["get_weather"] and not reply.content
    else:
        Weather.model_validate_json(reply.content)


class Person(BaseModel):
    name: str
    age: int


def test_a_response_object_with_a_name_field_is_not_taken_for_a_tool_call(chat):
    reply = chat.bind_tools([get_weather], response_format=Person).invoke("Extract: Alice is 30 years old.",
                                                                          max_tokens=40)
    assert reply.tool_calls == [] and reply.response_metadata["finish_reason"] == "stop"
    assert Person.model_validate_json(reply.content) == Person(name="Alice", age=30)


def test_a_response_schema_with_defs_combines_with_tools(chat):
    schema = {"type": "object", "properties": {"home": {"$ref": "#/$defs/Address"}}, "required": ["home"],
              "$defs": {"Address": {"type": "object", "properties": {"city": {"type": "string"}},
                                    "required": ["city"]}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "Home", "schema": schema}}
    alone = chat.invoke("Alice lives in Paris. Where?", response_format=response_format, max_tokens=40)
    with_tools = chat.bind_tools([get_weather]).invoke("Alice lives in Paris. Where?",
                                                      response_format=response_format, max_tokens=40)
    assert set(json.loads(alone.content)) == {"home"} and set(json.loads(alone.content)["home"]) == {"city"}
    if not with_tools.tool_calls:  # the reply may be a call to get_weather or the object
        assert set(json.loads(with_tools.content)) == {"home"}
        assert set(json.loads(with_tools.content)["home"]) == {"city"}


def test_call_arguments_of_the_wrong_kind_name_the_mistake(chat):
    from langchain_core.documents import Document

    for documents in ("Paris is in France.", Document("Paris is in France."), [1]):
        with pytest.raises(ValueError, match="documents must be"):
            chat.invoke("Where is Paris?", documents=documents)
    as_list = chat.invoke("Where is Paris?", documents=["Paris is in France."], max_tokens=8).content
    assert chat.invoke("Where is Paris?", documents=(d for d in ["Paris is in France."]), max_tokens=8).content == \
        as_list  # any iterable of documents
    with pytest.raises(ValueError, match="tool_choice 'any' needs tools"):
        chat.invoke("Weather in Paris?", tool_choice="any")
    with pytest.raises(ValueError, match="tools must be a list"):
        chat.invoke("Weather in Paris?", tools=get_weather)
    # Tools given to the call (not through bind_tools) are converted as bind_tools converts them.
    direct = chat.invoke("Weather in Paris?", tools=[get_weather], tool_choice="get_weather")
    bound = chat.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Paris?")
    assert direct.tool_calls[0]["name"] == "get_weather"
    assert [(c["name"], c["args"]) for c in direct.tool_calls] == [(c["name"], c["args"]) for c in bound.tool_calls]


def test_unknown_tool_kwargs_are_still_refused(chat):
    with pytest.raises(ValueError, match="unknown call argument"):
        chat.bind_tools([get_weather], frobnicate=True).invoke("Hi")


# --- serialization -----------------------------------------------------------------------------------------------
def test_a_chain_holding_chat_braid_round_trips_through_dumps_and_loads(tiny_chat):
    chain = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{question}")]) | tiny_chat
    text = dumps(chain)
    path = ("braid_langchain", "chat_models", "ChatBraid")
    restored = loads(text, valid_namespaces=["braid_langchain"], allowed_objects="core",
                     additional_import_mappings={path: path})
    model = restored.last
    assert isinstance(model, ChatBraid) and model is not tiny_chat
    assert model.model_dump() == tiny_chat.model_dump()
    assert restored.invoke({"question": "Hi"}).content == chain.invoke({"question": "Hi"}).content
