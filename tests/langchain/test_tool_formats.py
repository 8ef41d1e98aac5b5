"""Each family's tool-call format against its real chat template (tests/fixtures/*.jinja): the family is recognised
from the template, the tools reach the template where it renders them, a call the template writes into the
history parses back to the same call, a forced call's structural tag accepts exactly what the template writes,
and malformed calls become invalid calls with a reason, never exceptions."""
from __future__ import annotations

import json
import pathlib

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from transformers.utils.chat_template_utils import render_jinja_template

from braid_langchain.chat_format import ChatFormat, template_inputs
from braid_langchain.messages import to_chat_messages
from braid_langchain.reasoning import THINK_CLOSE, THINK_OPEN, ReasoningFormat, ThoughtSplitter
from braid_langchain.tool_formats import (
    GENERIC,
    HERMES,
    JSON,
    LLAMA3,
    MISTRAL,
    PHI4,
    detect_tool_format,
    forced_call_tag,
    history_call_id,
    history_calls,
    rename_arguments,
    template_tools,
)
from braid_langchain.tool_parser import parse_tool_calls
from braid_langchain.tools import forced_call_schema
from braidinfer.chat_template import fold_system

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures"
TEMPLATES = {"qwen2.5": "qwen2_5", "qwen3": "qwen3", "mistral": "mistral_v0.3", "llama3.1": "llama3.1",
             "phi4-mini": "phi4_mini", "gemma2": "gemma2"}
FORMATS = {"qwen2.5": HERMES, "qwen3": HERMES, "mistral": MISTRAL, "llama3.1": LLAMA3, "phi4-mini": PHI4,
           "gemma2": JSON}
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>"}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
ARGS = {"city": "Paris", "days": 2}


def template(family: str) -> str:
    return (FIXTURES / f"{TEMPLATES[family]}_chat_template.jinja").read_text(encoding="utf-8")


def render(family: str, chat, tools=None, **kwargs) -> str:
    rendered, _ = render_jinja_template(conversations=[chat], tools=tools, chat_template=template(family),
                                        **SPECIALS, **kwargs)
    return rendered[0]


@pytest.mark.parametrize("family", TEMPLATES)
def test_the_family_is_recognised_from_its_template(family):
    assert detect_tool_format(template(family)) is FORMATS[family]


def test_unknown_templates_fall_back():
    assert detect_tool_format(None) is JSON
    assert detect_tool_format("{% for m in messages %}{{ m.content }}{% endfor %}") is JSON
    assert detect_tool_format("{% if tools %}{{ tools | tojson }}{% endif %}") is GENERIC


def _conversation(family: str, call_id: str = "call_0123456789abcdef01234567", system: bool = True):
    """An agent loop's conversation: a call and its result, converted as ChatBraid converts it for `family`.
    (Mistral v0.3's template renders the system prompt inside the last user turn only, so it is left out where a
    test compares renderings of two lengths.)"""
    fmt = FORMATS[family]
    messages = [*([SystemMessage("Be brief.")] if system else []), HumanMessage("Weather in Paris?"),
                AIMessage("", tool_calls=[{"name": "get_weather", "args": ARGS, "id": call_id}]),
                ToolMessage("sunny", tool_call_id=call_id)]
    chat = to_chat_messages(messages, inline_tool_calls=history_calls(fmt),
                            call_id=lambda i: history_call_id(fmt, i))
    chat, kwargs = template_tools(fmt, chat, [WEATHER])
    if family == "gemma2":
        chat = fold_system(chat)
    return chat, kwargs


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "mistral", "llama3.1", "phi4-mini"])
def test_tools_reach_the_template(family):
    chat, kwargs = _conversation(family)
    text = render(family, chat, add_generation_prompt=True, **kwargs)
    assert "Get the weather in a city." in text  # the tool's description, rendered by the template itself
    assert "get_weather" in text and "sunny" in text


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "mistral", "llama3.1", "phi4-mini", "gemma2"])
def test_a_call_the_template_writes_parses_back(family):
    """The assistant turn as the template renders it in the history (generation prompt cut off, end-of-turn
    markers, which the engine never puts in a reply's text, removed) parses to the original call."""
    chat, kwargs = _conversation(family, system=family != "mistral")
    head = render(family, chat[:_user_before_call(chat) + 1], add_generation_prompt=True, **kwargs)
    full = render(family, chat[:_user_before_call(chat) + 2], **kwargs)
    assert full.startswith(head), "the template renders the call turn after its generation prompt"
    reply = full[len(head):]
    for end in ("<|im_end|>\n", "</s>", "<|eot_id|>", "<|end|>", "<end_of_turn>\n"):
        reply = reply.removesuffix(end)
    thought = ReasoningFormat(THINK_OPEN, THINK_CLOSE, close_token_id=-1)
    if THINK_CLOSE in template(family):  # Qwen3 writes an empty thought before the latest turn's call
        splitter = ThoughtSplitter(thought)
        _, reply = splitter.feed(reply)
        reply += splitter.finish()[1]
    fmt = FORMATS[family]
    content, calls = parse_tool_calls(reply, open_tag=fmt.open or "<tool_call>",
                                      close_tag=fmt.close if fmt.open else "</tool_call>")
    assert content == ""
    assert [(c.name, c.args) for c in calls] == [("get_weather", ARGS)], reply


def _user_before_call(chat) -> int:
    return next(i for i, m in enumerate(chat) if m["role"] == "assistant") - 1


def test_gemma_gets_the_system_prompt_in_the_first_user_turn():
    chat = to_chat_messages([SystemMessage("Be brief."), HumanMessage("Hi")])
    with pytest.raises(Exception, match="System role not supported"):
        render("gemma2", chat)
    text = render("gemma2", fold_system(chat), add_generation_prompt=True)
    assert text == "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_gemma_gets_a_later_system_message_as_a_user_turn():
    gemma = ChatFormat(JSON, None, system_role=False, single_tokens=frozenset())
    chat = to_chat_messages([SystemMessage("Be brief."), HumanMessage("Hi"), AIMessage("Hello"),
                             SystemMessage("Now answer in French."), HumanMessage("Bye")])
    chat, kwargs = template_inputs(gemma, chat, [], None)
    assert render("gemma2", chat, add_generation_prompt=True, **kwargs) == (
        "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nNow answer in French.\n\nBye<end_of_turn>\n<start_of_turn>model\n")


def test_mistral_call_ids_are_nine_alphanumerics_and_stable():
    a = history_call_id(MISTRAL, "call_0123456789abcdef01234567")
    assert len(a) == 9 and a.isalnum() and a == history_call_id(MISTRAL, "call_0123456789abcdef01234567")
    assert history_call_id(MISTRAL, "abcDEF123") == "abcDEF123"
    assert history_call_id(HERMES, "call_x") == "call_x"


@pytest.mark.parametrize("text, open_tag, close_tag", [
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]', "[TOOL_CALLS]", None),
    ('[{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]', "[TOOL_CALLS]", None),  # tag dropped
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 2}', "[TOOL_CALLS]", None),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}', "<|python_tag|>", None),
    ('{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}', "<|python_tag|>", None),
    ('<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]<|/tool_call|>',
     "<|tool_call|>", "<|/tool_call|>"),
])
def test_each_format_parses(text, open_tag, close_tag):
    content, calls = parse_tool_calls(text, open_tag=open_tag, close_tag=close_tag)
    assert content == "" and [(c.name, c.args) for c in calls] == [("get_weather", ARGS)]


def test_mistral_named_calls_in_a_row():
    text = '[TOOL_CALLS]a[ARGS]{"x": 1}[TOOL_CALLS]b[ARGS]{}'
    _, calls = parse_tool_calls(text, open_tag="[TOOL_CALLS]", close_tag=None)
    assert [(c.name, c.args) for c in calls] == [("a", {"x": 1}), ("b", {})]


@pytest.mark.parametrize("text, open_tag, close_tag, name", [
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": ', "[TOOL_CALLS]", None, "get_weather"),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": ', "[TOOL_CALLS]", None, "get_weather"),
    ('[TOOL_CALLS]get_weather[ARGS][1, 2]', "[TOOL_CALLS]", None, "get_weather"),
    ("<|python_tag|>not json at all", "<|python_tag|>", None, None),
    ('<|tool_call|>[{"name": "get_weather", "arguments": 3}]<|/tool_call|>', "<|tool_call|>", "<|/tool_call|>",
     "get_weather"),
    ("<|tool_call|>[]<|/tool_call|>", "<|tool_call|>", "<|/tool_call|>", None),
])
def test_malformed_calls_are_invalid_with_a_reason(text, open_tag, close_tag, name):
    _, calls = parse_tool_calls(text, open_tag=open_tag, close_tag=close_tag)
    assert len(calls) == 1 and calls[0].args is None and calls[0].error and calls[0].name == name


@pytest.mark.parametrize("text, fmt", [
    ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', HERMES),
    ('[TOOL_CALLS] [{"name": "rm_rf", "arguments": {}}]', MISTRAL),
    ('[TOOL_CALLS]rm_rf[ARGS]{}', MISTRAL),
    ('<|python_tag|>{"name": "rm_rf", "parameters": {}}', LLAMA3),
    ('<|tool_call|>[{"name": "rm_rf", "arguments": {}}]<|/tool_call|>', PHI4),
    ('{"name": "rm_rf", "arguments": {}}', JSON),
])
def test_a_call_to_an_unbound_tool_is_invalid_in_every_format(text, fmt):
    stream = fmt.parser(tools=["get_weather"])
    calls = stream.feed(text) + stream.finish()
    assert [(c.name, c.args, c.error) for c in calls] == [("rm_rf", None, "no bound tool is named 'rm_rf'")]


@pytest.mark.parametrize("fmt", [HERMES, MISTRAL, LLAMA3, PHI4, GENERIC, JSON])
@pytest.mark.parametrize("text", ["", " \n"])  # e.g. a stop string hit first, or the thought used up max_tokens
def test_a_forced_reply_without_a_call_is_one_invalid_call_in_every_format(fmt, text):
    stream = fmt.parser(forced=True, tools=["get_weather"])
    events = stream.feed(text) + stream.finish()
    assert [(c.name, c.args, c.error) for c in events] == [(None, None, "the reply holds no tool call")]


def test_streamed_parsing_matches_whole_text_parsing_for_every_split():
    fmt = PHI4
    text = 'Sure.<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]<|/tool_call|>'
    whole = parse_tool_calls(text, open_tag=fmt.open, close_tag=fmt.close)
    for cut in range(1, len(text)):
        stream = fmt.parser()
        events = stream.feed(text[:cut]) + stream.feed(text[cut:]) + stream.finish()
        assert "".join(e for e in events if isinstance(e, str)) == whole[0]
        assert [e for e in events if not isinstance(e, str)] == whole[1]


# --- forced calls keep the family's fixed text --------------------------------------------------------------------
@pytest.fixture(scope="module")
def grammar_compiler():
    import xgrammar as xgr
    from qwen3_fixture import build_qwen3_tokenizer

    tok = build_qwen3_tokenizer()
    return tok, xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok)))


def _matcher(grammar_compiler, tag):
    import xgrammar as xgr

    from braidinfer.guided import GuidedDecoding
    from braidinfer.sampling.guided import GrammarCompiler

    tok, _ = grammar_compiler
    compiler = GrammarCompiler(tok, len(tok), [tok.eos_token_id])
    matcher = compiler.matcher(GuidedDecoding(structural_tag=tag))
    assert isinstance(matcher, xgr.GrammarMatcher)
    return matcher


@pytest.mark.parametrize("family", ["qwen2.5", "mistral", "phi4-mini"])
def test_the_forced_call_tag_accepts_what_the_template_writes(family, grammar_compiler):
    fmt = FORMATS[family]
    schema = rename_arguments(forced_call_schema([WEATHER], "get_weather"), fmt.args_key)
    tag = forced_call_tag(fmt, schema)
    body = json.dumps(fmt.call_json("get_weather", ARGS))
    written = {"qwen2.5": f"<tool_call>\n{body}\n</tool_call>", "mistral": f"[TOOL_CALLS] [{body}]",
               "phi4-mini": f"<|tool_call|>[{body}]<|/tool_call|>"}[family]
    assert _matcher(grammar_compiler, tag).accept_string(written)
    # Free whitespace inside the JSON is not allowed (a weak model would fill max_tokens with it) ...
    assert not _matcher(grammar_compiler, tag).accept_string(written.replace('{"name"', '{ "name"'))
    # ... nor a call without the family's fixed text.
    assert not _matcher(grammar_compiler, tag).accept_string(body)


def test_llama_forces_bare_json_with_parameters():
    schema = rename_arguments(forced_call_schema([WEATHER], "any"), LLAMA3.args_key)
    assert forced_call_tag(LLAMA3, schema) is None and schema["required"] == ["name", "parameters"]


def test_a_special_token_tag_is_matched_as_that_token(grammar_compiler):
    tok, _ = grammar_compiler
    schema = forced_call_schema([WEATHER], "get_weather")
    tag = forced_call_tag(HERMES, schema, single_tokens={"<tool_call>"})
    assert tag["format"]["elements"][:2] == [{"type": "token", "token": "<tool_call>"},
                                             {"type": "const_string", "value": "\n"}]
    matcher = _matcher(grammar_compiler, tag)
    assert not matcher.accept_string("<tool_")  # spelled out in ordinary tokens: refused
    assert matcher.accept_token(tok.convert_tokens_to_ids("<tool_call>"))
    assert matcher.accept_string("\n" + json.dumps({"name": "get_weather", "arguments": {"city": "Rome"}}))
