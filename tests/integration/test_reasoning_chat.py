"""ChatBraid on a reasoning model: a tiny random Qwen3 with Qwen3's real chat template (tests/qwen3_fixture.py).
Random weights write nonsense, so answers are forced through guided decoding, and each reply is compared with the
engine's own greedy continuation on an engine without prefix caching (the reference): the thought is what the
model writes after `<think>\\n` (at most max_reasoning_tokens tokens), the answer what it writes after the closed
thought, and a second turn reuses the first turn's KV exactly where the template re-renders the same tokens."""
from __future__ import annotations

import asyncio
import json
import pathlib
import shutil

import pytest
from langchain_core.messages import HumanMessage
from transformers import AutoTokenizer

from braid_langchain import ChatBraid, engines
from braid_langchain.tool_parser import parse_tool_calls
from braidinfer import LLM, SamplingParams
from braidinfer.guided import GuidedDecoding

PAGE = 4
ANSWER = GuidedDecoding(regex="(red|green|blue)")
MAX_TOKENS = 24


def engine_kwargs(num: int) -> dict:
    # A distinct max_num_seqs per test gives each test an engine (and prefix cache) of its own.
    return {"page_size": PAGE, "cpu_kv_cache_bytes": 1 << 22, "max_num_seqs": num}


@pytest.fixture(scope="module")
def ref(qwen3_chat_model):
    """(reference engine without prefix caching, the tokenizer loaded on its own)."""
    with LLM(model=qwen3_chat_model, device="cpu", dtype="float32", page_size=PAGE, cpu_kv_cache_bytes=1 << 22,
             enable_prefix_caching=False, progress=False) as off:
        yield off, AutoTokenizer.from_pretrained(qwen3_chat_model)
    for num in range(1, 6):
        engines.close_engine(qwen3_chat_model, "cpu", **engine_kwargs(num))


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def prompt_of(tok, chat, **kwargs) -> list[int]:
    return ids(tok, tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **kwargs))


def reference_reply(off: LLM, tok, opened: list[int], max_thought: int):
    """(thought ids, answer ids, [finished sequences]) as the design says, for a prompt that opens the thought:
    think until `</think>` or max_thought tokens, then `</think>\n\n` (after a newline where the thought was cut
    not ending with one, as the template renders it back) and the constrained answer."""
    close = tok.convert_tokens_to_ids("</think>")
    first = off.generate(opened, SamplingParams(temperature=0, max_tokens=max_thought, stop_token_ids=[close]))[0]
    assert first.finish_reason == "length" or first.token_ids[-1] == close, "the model ended inside its thought"
    thought = [t for t in first.token_ids if t != close]
    closing = [close, *ids(tok, "\n\n")]
    if first.token_ids[-1] != close and not tok.decode(thought[-1:]).endswith("\n"):
        closing = ids(tok, "\n") + closing
    second = off.generate(opened + thought + closing, SamplingParams(
        temperature=0, max_tokens=MAX_TOKENS - len(thought) - len(closing), guided=ANSWER))[0]
    return thought, second.token_ids, [opened + first.token_ids, opened + thought + closing + second.token_ids]


@pytest.mark.parametrize("max_thought", [3, 6])
def test_max_reasoning_tokens_closes_the_thought_and_the_answer_follows(qwen3_chat_model, ref, max_thought):
    off, tok = ref
    model = ChatBraid(model=qwen3_chat_model, device="cpu", temperature=0, max_tokens=MAX_TOKENS,
                      max_reasoning_tokens=max_thought, engine_kwargs=engine_kwargs(1))
    reply = model.invoke("Name a colour.", guided=ANSWER)
    prompt = prompt_of(tok, [{"role": "user", "content": "Name a colour."}])
    thought, answer, finished = reference_reply(off, tok, prompt + ids(tok, "<think>\n"), max_thought)
    closing = finished[1][len(prompt) + len(ids(tok, "<think>\n")) + len(thought):][: -len(answer) or None]
    assert reply.usage_metadata["input_tokens"] == len(prompt) + len(ids(tok, "<think>\n"))  # opened by ChatBraid
    assert len(thought) <= max_thought
    assert reply.content == tok.decode(answer, skip_special_tokens=True) and reply.content in ("red", "green", "blue")
    assert reply.additional_kwargs["reasoning_content"] == tok.decode(thought, skip_special_tokens=True).strip()
    assert "<think>" not in reply.content and "</think>" not in reply.content
    # The call argument takes what the field takes (an integral float too) and gives the same reply.
    unbound = ChatBraid(model=qwen3_chat_model, device="cpu", temperature=0, max_tokens=MAX_TOKENS,
                        engine_kwargs=engine_kwargs(1))
    again = unbound.invoke("Name a colour.", guided=ANSWER, max_reasoning_tokens=float(max_thought))
    assert again.content == reply.content
    assert again.additional_kwargs["reasoning_content"] == reply.additional_kwargs["reasoning_content"]
    # The thought's tokens and the closing `</think>`, after its newline (the prompt's `<think>\n` is not generated).
    assert reply.usage_metadata["output_token_details"]["reasoning"] == len(thought) + len(closing) - len(
        ids(tok, "\n\n"))
    assert reply.usage_metadata["output_tokens"] == len(thought) + len(closing) + len(answer)

    streamed = None
    for chunk in model.stream("Name a colour.", guided=ANSWER):
        assert "</think>" not in chunk.content
        streamed = chunk if streamed is None else streamed + chunk
    asynced = asyncio.run(model.ainvoke("Name a colour.", guided=ANSWER))
    for other in (streamed, asynced):
        assert other.content == reply.content
        assert other.additional_kwargs == reply.additional_kwargs
        assert other.usage_metadata["output_token_details"] == reply.usage_metadata["output_token_details"]


def test_reasoning_false_closes_the_thought_through_the_template(qwen3_chat_model, ref):
    off, tok = ref
    model = ChatBraid(model=qwen3_chat_model, device="cpu", temperature=0, max_tokens=4, reasoning=False,
                      engine_kwargs=engine_kwargs(2))
    reply = model.invoke("Hi")
    expected = prompt_of(tok, [{"role": "user", "content": "Hi"}], enable_thinking=False)
    assert tok.decode(expected).endswith("<think>\n\n</think>\n\n")
    assert reply.usage_metadata["input_tokens"] == len(expected)
    plain = off.generate(expected, SamplingParams(temperature=0, max_tokens=4))[0]
    assert "<think>" not in plain.text  # the model did not open a thought of its own, so all is answer
    assert reply.content == plain.text and "reasoning_content" not in reply.additional_kwargs
    assert reply.usage_metadata["output_token_details"] == {"reasoning": 0}


@pytest.mark.parametrize("model_setting, call_setting, enable_thinking", [
    (None, None, None), (True, None, True), (False, None, False), (True, False, False), (False, True, True),
    (None, False, False)])
def test_reasoning_switches_qwen3s_template_and_a_call_overrides_the_model(qwen3_chat_model, ref, model_setting,
                                                                             call_setting, enable_thinking):
    _, tok = ref
    model = ChatBraid(model=qwen3_chat_model, device="cpu", temperature=0, max_tokens=1, reasoning=model_setting,
                      engine_kwargs=engine_kwargs(3))
    kwargs = {} if call_setting is None else {"reasoning": call_setting}
    chat = [{"role": "user", "content": "Hi"}]
    # None renders the template's own default (Qwen3: thinking on), with no enable_thinking at all.
    expected = prompt_of(tok, chat, **({} if enable_thinking is None else {"enable_thinking": enable_thinking}))
    assert (prompt_of(tok, chat, enable_thinking=False) != prompt_of(tok, chat))  # the switch changes the prompt
    assert model.invoke("Hi", **kwargs).usage_metadata["input_tokens"] == len(expected)
    assert asyncio.run(model.ainvoke("Hi", **kwargs)).usage_metadata["input_tokens"] == len(expected)


def test_a_turn_with_thinking_is_reused_exactly_as_the_template_re_renders_it(qwen3_chat_model, ref):
    off, tok = ref
    model = ChatBraid(model=qwen3_chat_model, device="cpu", temperature=0, max_tokens=MAX_TOKENS,
                      max_reasoning_tokens=4, engine_kwargs=engine_kwargs(3))
    first = model.invoke([HumanMessage("Name a colour.")], guided=ANSWER)
    prompt1 = prompt_of(tok, [{"role": "user", "content": "Name a colour."}])
    _, _, finished = reference_reply(off, tok, prompt1 + ids(tok, "<think>\n"), 4)
    assert first.additional_kwargs["reasoning_content"]

    history = [HumanMessage("Name a colour."), first, HumanMessage("Another?")]
    second = model.invoke(history, guided=ANSWER)
    # The template drops the earlier turn's thought; ChatBraid passed it as reasoning_content, as Qwen3 expects.
    chat = [{"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": first.content,
             "reasoning_content": first.additional_kwargs["reasoning_content"]},
            {"role": "user", "content": "Another?"}]
    prompt2 = prompt_of(tok, chat)
    assert first.additional_kwargs["reasoning_content"] not in tok.decode(prompt2)
    assert second.usage_metadata["input_tokens"] == len(prompt2) + len(ids(tok, "<think>\n"))
    thought, answer, _ = reference_reply(off, tok, prompt2 + ids(tok, "<think>\n"), 4)
    assert second.content == tok.decode(answer, skip_special_tokens=True)
    # Exact reuse: what the first turn computed, up to where the re-rendered history differs, floored to pages.
    opened2 = prompt2 + ids(tok, "<think>\n")  # ChatBraid opens Qwen3's thought itself for a budget
    shared = max(_common(opened2, seq[:-1]) for seq in finished)
    assert second.usage_metadata["input_token_details"]["cache_read"] == min(shared, len(opened2) - 1) // PAGE * PAGE


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}}


def test_a_forced_call_keeps_the_family_text_and_parses(qwen3_chat_model):
    model = ChatBraid(model=qwen3_chat_model, device="cpu", temperature=0, max_tokens=64, reasoning=False,
                      engine_kwargs=engine_kwargs(4))
    bound = model.bind_tools([WEATHER], tool_choice="any")
    reply = bound.invoke("Weather in Paris?")
    assert [c["name"] for c in reply.tool_calls] == ["get_weather"] and reply.tool_calls[0]["args"]["city"] in (
        "Paris", "Rome")
    # The reply's text as generated: Qwen3's own block around the constrained JSON.
    engine = model._engine({})
    request = model._request([HumanMessage("Weather in Paris?")], None, engine,
                             {"tools": [WEATHER], "tool_choice": "any"})
    out = engine.generate(request.prompt, request.params)[0]
    assert out.text.startswith("<tool_call>\n{") and out.text.endswith("}\n</tool_call>"), out.text
    _, calls = parse_tool_calls(out.text)
    assert json.dumps(calls[0].args) == json.dumps(reply.tool_calls[0]["args"])


def test_a_forced_call_after_a_thought(qwen3_chat_model):
    model = ChatBraid(model=qwen3_chat_model, device="cpu", temperature=0, max_tokens=64, max_reasoning_tokens=3,
                      engine_kwargs=engine_kwargs(5))
    reply = model.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Rome?")
    assert [c["name"] for c in reply.tool_calls] == ["get_weather"], reply
    # at most 3 thought tokens, a newline where the engine cut the thought, and `</think>`
    assert reply.usage_metadata["output_token_details"]["reasoning"] <= 3 + 1 + 1
    assert "<tool_call>" not in reply.additional_kwargs.get("reasoning_content", "")


# --- DeepSeek-R1-distill: the template opens the thought and drops it from the history --------------------------
R1_TEMPLATE = pathlib.Path(__file__).parents[1] / "fixtures" / "deepseek_r1_distill_chat_template.jinja"


@pytest.fixture(scope="module")
def r1_chat_model(qwen3_chat_model, tmp_path_factory):
    """The tiny Qwen3 under the R1-distill chat template (its `<｜User｜>` markers are ordinary text here)."""
    path = tmp_path_factory.mktemp("tiny-r1")
    shutil.copytree(qwen3_chat_model, path, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = R1_TEMPLATE.read_text(encoding="utf-8")
    tok.save_pretrained(path)
    yield str(path)
    for num in (6, 7):
        engines.close_engine(str(path), "cpu", **engine_kwargs(num))


def test_r1_template_opens_the_thought_and_its_history_is_reused_exactly(r1_chat_model, ref):
    off, _ = ref
    tok = AutoTokenizer.from_pretrained(r1_chat_model)
    model = ChatBraid(model=r1_chat_model, device="cpu", temperature=0, max_tokens=MAX_TOKENS,
                      max_reasoning_tokens=3, engine_kwargs=engine_kwargs(6))
    first = model.invoke("Name a colour.", guided=ANSWER)
    opened = prompt_of(tok, [{"role": "user", "content": "Name a colour."}])
    assert tok.decode(opened).endswith("<think>\n")
    assert first.usage_metadata["input_tokens"] == len(opened)  # the template's own `<think>\n`, nothing added
    thought, answer, finished = reference_reply(off, tok, opened, 3)
    assert first.content == tok.decode(answer, skip_special_tokens=True)
    assert first.additional_kwargs["reasoning_content"] == tok.decode(thought, skip_special_tokens=True).strip()
    closing = finished[1][len(opened) + len(thought):][: -len(answer) or None]
    assert first.usage_metadata["output_token_details"]["reasoning"] == len(thought) + len(closing) - len(
        ids(tok, "\n\n"))  # the thought, a newline where it was cut not ending with one, and `</think>`

    second = model.invoke([HumanMessage("Name a colour."), first, HumanMessage("Another?")], guided=ANSWER)
    chat = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": first.content},
            {"role": "user", "content": "Another?"}]
    prompt2 = prompt_of(tok, chat)  # the R1 template keeps no thought of earlier turns
    assert second.usage_metadata["input_tokens"] == len(prompt2)
    shared = max(_common(prompt2, seq[:-1]) for seq in finished)
    assert second.usage_metadata["input_token_details"]["cache_read"] == min(shared, len(prompt2) - 1) // PAGE * PAGE

    silent = ChatBraid(model=r1_chat_model, device="cpu", max_tokens=2, reasoning=False,
                       engine_kwargs=engine_kwargs(7)).invoke("Hi")
    closed = prompt_of(tok, [{"role": "user", "content": "Hi"}]) + ids(tok, "\n</think>\n\n")
    assert silent.usage_metadata["input_tokens"] == len(closed)


# --- where the thought leaves no room ------------------------------------------------------------------------------
def test_a_forced_call_whose_thought_used_up_max_tokens_raises_instead_of_returning_none(qwen3_chat_model, ref):
    """Qwen3 thinks by default; 8 tokens end the reply inside the thought, before any call: function-calling
    structured output says so, where it returned None without a word."""
    from langchain_core.exceptions import OutputParserException
    from pydantic import BaseModel

    class Colour(BaseModel):
        name: str

    model = ChatBraid(model=qwen3_chat_model, device="cpu", temperature=0, max_tokens=8, engine_kwargs=engine_kwargs(1))
    with pytest.raises(OutputParserException, match="no tool call .finish_reason 'length'; raise max_tokens"):
        model.with_structured_output(Colour, method="function_calling").invoke("Name a colour.")


@pytest.mark.parametrize("max_thought", [None, 500])
def test_a_thought_cut_by_the_context_ends_the_reply_with_length(qwen3_chat_model, ref, max_thought):
    """The model's context (max_model_len 48) ends the thought before its budget or max_tokens: the reply ends there
    with finish_reason "length", as a plain reply does, instead of phase 2 failing on a prompt past the context."""
    model = ChatBraid(model=qwen3_chat_model, device="cpu", temperature=0, max_tokens=500, reasoning=True,
                      max_reasoning_tokens=max_thought, engine_kwargs={**engine_kwargs(1), "max_model_len": 48})
    reply = model.invoke("Name a colour.", guided=ANSWER)
    usage = reply.usage_metadata
    assert reply.response_metadata["finish_reason"] == "length" and reply.content == ""
    assert usage["input_tokens"] + usage["output_tokens"] == 48
    engines.close_engine(qwen3_chat_model, "cpu", **engine_kwargs(1), max_model_len=48)


@pytest.mark.parametrize("max_tokens, max_thought", [(10, 9), (5, 4), (5, 100)])
def test_max_tokens_bounds_thought_closing_and_answer_together(qwen3_chat_model, ref, max_tokens, max_thought):
    """A thought that leaves no room for the closing text and one answer token ends the reply ("length") within
    max_tokens, where the engine used to close it and answer anyway."""
    model = ChatBraid(model=qwen3_chat_model, device="cpu", temperature=0, max_tokens=max_tokens,
                      max_reasoning_tokens=max_thought, engine_kwargs=engine_kwargs(1))
    reply = model.invoke("Name a colour.")
    assert reply.usage_metadata["output_tokens"] <= max_tokens
    assert reply.response_metadata["finish_reason"] == "length"


def test_stop_strings_never_cut_the_thought(r1_chat_model):
    """A stop string the thought contains ends neither the thought nor the reply (it applies to the answer), with or
    without a thinking budget; before, without one, it cut the thought."""
    model = ChatBraid(model=r1_chat_model, device="cpu", temperature=0, max_tokens=40, engine_kwargs=engine_kwargs(6))
    free = model.invoke("Name a colour.")
    thought = free.additional_kwargs["reasoning_content"]
    stop = next(word for word in thought.split()[2:] if word.isalpha())  # a word inside the thought
    for budget in (None, 1000):
        reply = model.invoke("Name a colour.", stop=[stop], max_reasoning_tokens=budget)
        assert reply.additional_kwargs["reasoning_content"] == thought
        assert reply.usage_metadata["output_tokens"] == free.usage_metadata["output_tokens"]


def test_a_constraint_that_cannot_compile_fails_before_the_thought(qwen3_chat_model, ref):
    """A two-phase reply compiles its constraint before phase 1: a bad one raises at once, with nothing streamed,
    as without reasoning (it used to come after the whole thought, or never when the thought used up max_tokens)."""
    from braidinfer.errors import GrammarCompileError

    model = ChatBraid(model=qwen3_chat_model, device="cpu", temperature=0, max_tokens=8, engine_kwargs=engine_kwargs(1))
    bad = GuidedDecoding(regex="(unclosed")
    chunks = []
    with pytest.raises(GrammarCompileError):
        for chunk in model.stream("Name a colour.", guided=bad):
            chunks.append(chunk)
    assert chunks == []
    with pytest.raises(GrammarCompileError):
        asyncio.run(model.ainvoke("Name a colour.", guided=bad))
