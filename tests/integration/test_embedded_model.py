"""The embedded SmolLM2-135M-Instruct GGUF: our engine against transformers' own load of the same file."""
from __future__ import annotations

import pytest
import torch

from braidinfer import LLM, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three uses of copper.",
    "Explain what a prime number is in one sentence.",
]


@pytest.fixture(scope="module")
def llm():
    with LLM(device="cpu", progress=False) as llm:  # model=None: the embedded default, as a user gets it
        yield llm


def test_greedy_tokens_equal_transformers(hf_smollm):
    """The architecture against transformers on the same float32 weights (the CPU int4 form, which rounds the
    projections' inputs to bfloat16, has its own tests in test_quantized_engine.py)."""
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    with LLM(device="cpu", progress=False, cpu_int4=False) as llm:
        _assert_greedy_equal(llm, hf_smollm, params)


def _assert_greedy_equal(llm, hf_smollm, params):
    prompts = [llm.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        ref = hf_smollm.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        assert out.token_ids == ref[0, len(prompt):].tolist()


def test_chat_answers_sensibly(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=30))
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # the model ends its turn with <|im_end|>
    assert "<|im_end|>" not in out.text


def test_second_turn_reuses_the_first(llm):
    params = SamplingParams(temperature=0, max_tokens=40)
    messages = [{"role": "system", "content": "You are a terse assistant. " * 8},
                {"role": "user", "content": "Name a colour."}]
    first = llm.chat(messages, params)
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Another one?"}]
    second = llm.chat(messages, params)
    # The rendered history is a token-for-token prefix of the new prompt: all its full pages come from the cache.
    assert second.usage.cached_prompt_tokens >= (first.usage.prompt_tokens // 16) * 16 > 0
