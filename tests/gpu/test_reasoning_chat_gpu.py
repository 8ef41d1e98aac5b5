"""ChatBraid on CUDA with a reasoning model (tiny random Qwen3, Qwen3's real chat template): the thinking budget's
two phases and a forced call in Qwen3's own `<tool_call>` block, through the default GPU paths (CUDA graphs and
FlashInfer when installed). Random bf16 weights write nonsense, so only the structure is checked: the thought stays
within its budget and out of `content`, the answer matches its constraint, the call parses."""
from __future__ import annotations

import re

import pytest

from braid_langchain import ChatBraid, engines
from braidinfer.guided import GuidedDecoding

pytestmark = pytest.mark.gpu

ENGINE = {"page_size": 16, "max_num_seqs": 4}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def model(qwen3_chat_model):
    yield ChatBraid(model=qwen3_chat_model, device="cuda", temperature=0, max_tokens=64, engine_kwargs=ENGINE)
    engines.close_engine(qwen3_chat_model, "cuda", **ENGINE)


@pytest.mark.parametrize("budget", [1, 8])
def test_thinking_budget_then_a_constrained_answer(model, budget):
    replies = [model.invoke(f"Name colour {i}.", max_reasoning_tokens=budget,
                            guided=GuidedDecoding(regex="(red|green|blue)")) for i in range(3)]
    for reply in replies:
        num_thought = reply.usage_metadata["output_token_details"]["reasoning"]
        # the thought, a newline where the engine cut it not ending with one, and `</think>`
        assert "</think>" not in reply.content and num_thought <= budget + 2
        if reply.content == "":  # random weights may end the text inside the thought (end of text, no answer)
            assert reply.response_metadata["finish_reason"] == "stop" and num_thought <= budget
        else:
            assert re.fullmatch("red|green|blue", reply.content) and num_thought >= 1


def test_forced_call_in_the_family_format(model):
    for city in ("Paris?", "Rome?"):
        reply = model.bind_tools([WEATHER], tool_choice="any").invoke(city, reasoning=False)
        assert [c["name"] for c in reply.tool_calls] == ["get_weather"]
        assert reply.tool_calls[0]["args"]["city"] in ("Paris", "Rome")
