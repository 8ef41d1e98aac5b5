"""Chat templates other than SmolLM2's, on tiny random Llama checkpoints: one that renders tools itself (tools and
tool calls must reach it through `tools=` and the `tool_calls` field) and one that cannot render some conversations.
Random weights write nonsense, so the checks are on the prompt (its exact token count) and on forced calls,
which constrained decoding keeps valid whatever the weights."""
from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from transformers import AutoTokenizer

from braid_langchain import ChatBraid, engines
from braidinfer.errors import InvalidRequestError
from tests.conftest import build_tiny_model
from tests.langchain.conftest import ENGINE

# A small template in the style of Qwen3's: tools in the system turn, calls as <tool_call> blocks, results as
# <tool_response> blocks in a user turn.
TOOLS_TEMPLATE = """
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools
<tools>
{% for t in tools %}{{ t | tojson }}
{% endfor %}</tools><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'user' %}<|im_start|>user
{{ m.content }}<|im_end|>
{% elif m.role == 'assistant' %}<|im_start|>assistant
{{ m.content }}{% for c in m.tool_calls or [] %}<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

STRICT_TEMPLATE = (
    "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}{% endif %}"
    "{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """{"tools": dir, "strict": dir}: the same tiny random model under each template."""
    tokenizer = engines.get_engine(ENGINE["model"], ENGINE["device"]).tokenizer
    dirs = {}
    for name, template in [("tools", TOOLS_TEMPLATE), ("strict", STRICT_TEMPLATE)]:
        path = tmp_path_factory.mktemp(f"tiny-{name}")
        build_tiny_model("llama", path, tokenizer)
        with_template = AutoTokenizer.from_pretrained(path)
        with_template.chat_template = template
        with_template.save_pretrained(path)
        dirs[name] = str(path)
    yield dirs
    for path in dirs.values():
        engines.close_engine(path, "cpu")


def test_template_with_tools_gets_tools_and_calls_natively(tiny_dirs):
    model = ChatBraid(model=tiny_dirs["tools"], device="cpu", temperature=0, max_tokens=40)
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}}
    call = model.bind_tools([weather], tool_choice="any").invoke([SystemMessage("Be brief."), HumanMessage("Paris?")])
    assert [tc["name"] for tc in call.tool_calls] == ["get_weather"] and call.tool_calls[0]["args"]["city"] in (
        "Paris", "Rome")

    engine = engines.get_engine(tiny_dirs["tools"], "cpu")
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris?"}]
    # The template saw `tools=` and nothing was added to the system message (no fallback tool prompt).
    assert call.usage_metadata["input_tokens"] == len(engine.apply_chat_template(expected, tools=[weather]))

    result = ToolMessage("sunny", tool_call_id=call.tool_calls[0]["id"], name="get_weather")
    reply = model.bind_tools([weather]).invoke([HumanMessage("Paris?"), call, result], max_tokens=2)
    args = call.tool_calls[0]["args"]
    history = [{"role": "user", "content": "Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"type": "function", "id": call.tool_calls[0]["id"],
                    "function": {"name": "get_weather", "arguments": args}}]},
               {"role": "tool", "content": "sunny", "tool_call_id": call.tool_calls[0]["id"], "name": "get_weather"}]
    assert reply.usage_metadata["input_tokens"] == len(engine.apply_chat_template(history, tools=[weather]))


def test_messages_the_template_cannot_render_are_a_clear_error(tiny_dirs):
    model = ChatBraid(model=tiny_dirs["strict"], device="cpu", max_tokens=2)
    assert model.invoke([HumanMessage("Hi"), HumanMessage("there")]).usage_metadata  # merged into one user turn
    with pytest.raises(InvalidRequestError, match="cannot render these messages: Conversation roles must alternate"):
        model.invoke([AIMessage("Hello"), HumanMessage("Hi")])
