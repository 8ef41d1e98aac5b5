"""ChatBraid end to end under each family's real chat template (tests/fixtures/*.jinja) on a tiny random Llama: the
prompt is the template's own rendering of the conversation with the family's conventions (Mistral's 9-character
call ids, Phi-4-mini's tools in the system message, Gemma's system prompt in the first user turn), and a forced
call comes back parsed, its fixed text written as the family writes it."""
from __future__ import annotations

import pathlib

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from transformers import AutoTokenizer

from braid_langchain import ChatBraid, engines
from tests.conftest import build_tiny_model
from tests.langchain.conftest import ENGINE

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures"
FILES = {"qwen2.5": "qwen2_5", "mistral": "mistral_v0.3", "llama3.1": "llama3.1", "phi4-mini": "phi4_mini",
         "gemma2": "gemma2"}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}}
CALL_ID = "call_0123456789abcdef01234567"


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """{family: directory}: one tiny random Llama (SmolLM2's tokenizer) saved under each family's template."""
    tokenizer = engines.get_engine(ENGINE["model"], ENGINE["device"]).tokenizer
    base = tmp_path_factory.mktemp("tiny-family")
    build_tiny_model("llama", base, tokenizer)
    dirs = {}
    for family, name in FILES.items():
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        for f in base.iterdir():
            (path / f.name).write_bytes(f.read_bytes())
        tok = AutoTokenizer.from_pretrained(path)
        tok.chat_template = (FIXTURES / f"{name}_chat_template.jinja").read_text(encoding="utf-8")
        tok.save_pretrained(path)
        dirs[family] = str(path)
    yield dirs
    for path in dirs.values():
        engines.close_engine(path, "cpu")


def _prompt_text(model: ChatBraid, messages, **call) -> str:
    engine = model._engine({})
    return engine.tokenizer.decode(model._request(messages, None, engine, call).prompt)


AGENT_LOOP = [HumanMessage("Weather in Paris?"),
              AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": CALL_ID}]),
              ToolMessage("sunny", tool_call_id=CALL_ID)]


@pytest.mark.parametrize("family, expected", [
    ("qwen2.5", ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
                 "<tool_response>\nsunny\n</tool_response>", '"description": "Get the weather in a city."']),
    ("mistral", ["[AVAILABLE_TOOLS]", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "',
                 '[TOOL_RESULTS] {"content": sunny, "call_id": "']),
    ("llama3.1", ["Environment: ipython", '{"name": "get_weather", "parameters": {"city": "Paris"}}',
                  "ipython<|end_header_id|>"]),
    ("phi4-mini", ['<|tool|>[{"name": "get_weather"', '<|tool_call|>[{"name": "get_weather", "arguments": '
                   '{"city": "Paris"}}]<|/tool_call|>']),
])
def test_an_agent_loop_renders_in_the_family_format(family_dirs, family, expected):
    model = ChatBraid(model=family_dirs[family], device="cpu", temperature=0)
    text = _prompt_text(model, AGENT_LOOP, tools=[WEATHER])
    for piece in expected:
        assert piece in text, (piece, text)
    if family == "mistral":  # the call and its result carry the same 9-character id
        call_id = text.split('"id": "')[1][:9]
        assert call_id.isalnum() and f'"call_id": "{call_id}"' in text


def test_gemma_folds_the_system_prompt_into_the_first_user_turn(family_dirs):
    model = ChatBraid(model=family_dirs["gemma2"], device="cpu", temperature=0, max_tokens=2)
    text = _prompt_text(model, [SystemMessage("Be brief."), HumanMessage("Hi")])
    assert "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n" in text
    assert model.invoke([SystemMessage("Be brief."), HumanMessage("Hi")]).usage_metadata["input_tokens"] > 0


def test_gemma_gets_a_later_system_message_as_a_user_turn(family_dirs):
    model = ChatBraid(model=family_dirs["gemma2"], device="cpu", temperature=0, max_tokens=2)
    messages = [HumanMessage("Hi"), AIMessage("Hello"), SystemMessage("Now answer in French."), HumanMessage("Bye")]
    text = _prompt_text(model, messages)
    assert "<start_of_turn>user\nNow answer in French.\n\nBye<end_of_turn>\n<start_of_turn>model\n" in text
    assert model.invoke(messages).usage_metadata["input_tokens"] > 0


@pytest.mark.parametrize("family", ["qwen2.5", "mistral", "llama3.1", "phi4-mini"])  # gemma2: JSON, as SmolLM2
def test_a_forced_call_parses_in_every_family(family_dirs, family):
    model = ChatBraid(model=family_dirs[family], device="cpu", temperature=0, max_tokens=96)
    reply = model.bind_tools([WEATHER], tool_choice="any").invoke([HumanMessage("Weather in Rome?")])
    assert [c["name"] for c in reply.tool_calls] == ["get_weather"], reply
    assert reply.tool_calls[0]["args"]["city"] in ("Paris", "Rome")
    assert reply.content == ""


def test_gemma_gets_tool_results_as_user_turns(family_dirs):
    model = ChatBraid(model=family_dirs["gemma2"], device="cpu", temperature=0)
    text = _prompt_text(model, [SystemMessage("Be brief."), *AGENT_LOOP], tools=[WEATHER])
    assert '<start_of_turn>model\n{"name": "get_weather", "arguments": {"city": "Paris"}}<end_of_turn>\n' in text
    assert "<start_of_turn>user\nResult of the tool call:\nsunny<end_of_turn>\n<start_of_turn>model\n" in text
    assert text.count("<start_of_turn>user\nBe brief.") == 1  # with the tool prompt, in the first user turn
