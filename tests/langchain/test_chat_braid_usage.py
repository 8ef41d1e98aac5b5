"""Usage that a caller can trust: `cache_read` counts only prompt tokens computed before the call began (pinning or
not, sync or async, stream or invoke), checked against hand-computed page counts and against an engine with prefix
caching off; token counting uses the model's own tokenizer and chat template, and equals the next call's
`input_tokens`."""
from __future__ import annotations

import asyncio
import itertools

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage, trim_messages
from langchain_core.tools import tool

from braid_langchain import ChatBraid, engines
from tests.langchain.conftest import GREEDY

POOL = {"num_kv_pages": 1024}  # an engine of the test's own (16k tokens of KV: quick to set up)
_unique = itertools.count()


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return "sunny"


@pytest.fixture(scope="module")
def cached():
    """A ChatBraid on an engine of its own, prefix caching on (the default)."""
    yield ChatBraid(**GREEDY, max_tokens=6, engine_kwargs=POOL)
    engines.close_engine(None, "cpu", **POOL)


@pytest.fixture(scope="module")
def uncached():
    """The same model with prefix caching off: every prompt token is computed on every call."""
    settings = {**POOL, "enable_prefix_caching": False}
    yield ChatBraid(**GREEDY, max_tokens=6, engine_kwargs=settings)
    engines.close_engine(None, "cpu", **settings)


def _system() -> SystemMessage:
    """A system prompt no earlier call has seen (about 90 tokens: several full pages)."""
    return SystemMessage(f"Conversation {next(_unique)}. You are a careful assistant who answers every question "
                         "about astronomy in one short sentence, citing the planet by name. " * 2)


def _call(chat: ChatBraid, messages, how: str) -> AIMessage:
    if how == "invoke":
        return chat.invoke(messages)
    if how == "ainvoke":
        return asyncio.run(chat.ainvoke(messages))
    if how == "stream":
        chunks = list(chat.stream(messages))
    else:
        async def collect():
            return [c async for c in chat.astream(messages)]

        chunks = asyncio.run(collect())
    full = chunks[0]
    for c in chunks[1:]:
        full += c
    return full


def _cache_read(message: AIMessage) -> int:
    return message.usage_metadata["input_token_details"]["cache_read"]


def _expected_reuse(engine, earlier: list[dict], now: list[dict]) -> int:
    """Hand count: the whole pages of the common token prefix of an earlier prompt and this one (rendered by the
    engine's template directly), at most all but the last prompt token."""
    a, b = engine.apply_chat_template(earlier), engine.apply_chat_template(now)
    common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    page = engine.config.page_size
    return min(common, len(b) - 1) // page * page


@pytest.mark.parametrize("pin", [True, False], ids=["pinned", "unpinned"])
@pytest.mark.parametrize("how", ["invoke", "stream", "ainvoke", "astream"])
def test_cache_read_is_only_what_was_computed_before_the_call(cached, pin, how):
    chat = cached.model_copy(update={"pin_prefixes": pin})
    engine = engines.get_engine(None, "cpu", **POOL)
    system = _system()
    first_q, second_q = HumanMessage("Which planet is largest?"), HumanMessage("Which planet has rings?")
    as_dicts = lambda q: [{"role": "system", "content": system.content}, {"role": "user", "content": q.content}]  # noqa: E731

    first = _call(chat, [system, first_q], how)
    again = _call(chat, [system, first_q], how)
    other = _call(chat, [system, second_q], how)

    n = first.usage_metadata["input_tokens"]
    assert n == len(engine.apply_chat_template(as_dicts(first_q)))
    assert _cache_read(first) == 0  # a system prompt never seen: nothing was computed before (pinning or not)
    assert _cache_read(again) == _expected_reuse(engine, as_dicts(first_q), as_dicts(first_q)) > 0
    assert _cache_read(other) == _expected_reuse(engine, as_dicts(first_q), as_dicts(second_q)) > 0
    for message in (first, again, other):
        details = message.usage_metadata["input_token_details"]
        assert details["cache_creation"] == message.usage_metadata["input_tokens"] - details["cache_read"]


def test_usage_and_replies_match_an_engine_with_caching_off(cached, uncached):
    system = _system()
    conversation = [[system, HumanMessage("Name a moon.")], [system, HumanMessage("Name a moon.")],
                    [system, HumanMessage("Name a comet.")]]
    with_cache = [cached.invoke(m) for m in conversation]
    without = [uncached.invoke(m) for m in conversation]
    assert [m.content for m in with_cache] == [m.content for m in without]  # reuse is exact
    for a, b in zip(with_cache, without):
        assert a.usage_metadata["input_tokens"] == b.usage_metadata["input_tokens"]
        assert b.usage_metadata["input_token_details"] == {"cache_read": 0, "cache_creation": 0}
    # What caching saved is exactly the tokens the caching-off engine computed again: none on the first call.
    assert [_cache_read(m) for m in with_cache][0] == 0
    assert all(_cache_read(m) > 0 for m in with_cache[1:])


def test_token_counts_use_the_models_tokenizer(chat):
    engine = engines.get_engine(None, "cpu")
    text = "Braid keeps the KV cache of shared prefixes, so repeated system prompts cost nothing the second time."
    reference = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert chat.get_token_ids(text) == list(reference)
    assert chat.get_num_tokens(text) == len(reference) > 15


def test_counted_message_tokens_equal_the_reported_input_tokens(chat):
    model = chat.bind_tools([get_weather])
    call = AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1"}])
    conversation = [SystemMessage("You are brief."), HumanMessage("Weather in Paris?"), call,
                    ToolMessage("sunny", tool_call_id="call_1")]
    for messages, tools in [(conversation[:2], None), (conversation, [get_weather])]:
        counted = chat.get_num_tokens_from_messages(messages, tools=tools)
        reply = (model if tools else chat).invoke(messages)
        assert counted == reply.usage_metadata["input_tokens"]
    assert chat.get_num_tokens_from_messages(conversation, tools=[get_weather]) > \
        chat.get_num_tokens_from_messages(conversation)  # the tool prompt counts


def test_trim_messages_counts_with_chat_braid(chat):
    history = [SystemMessage("You are brief."), HumanMessage("First question, about the moon " * 5),
               AIMessage("A first answer about the moon " * 5), HumanMessage("Second question?")]

    def trim(budget):
        return trim_messages(history, max_tokens=budget, token_counter=chat, strategy="first")

    three = chat.get_num_tokens_from_messages(history[:3])
    assert trim(three) == history[:3]  # the longest prefix whose rendering fits, to the token
    assert trim(three - 1) == history[:2]
