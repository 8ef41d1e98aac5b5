"""TokenizedPrompt: ids of the engine's own tokenizer are taken without the per-id check and give what the same
prompt as a string or a plain list gives; ids of any other tokenizer are checked like a plain list, and ids the
model's vocabulary cannot hold are refused either way."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from braidinfer import LLM, SamplingParams, TokenizedPrompt
from braidinfer.errors import InvalidRequestError

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
TEXT = "The river delta spreads into many channels"


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    with LLM(model=tiny_model_dir("llama", seed=3), device="cpu", dtype="float32", page_size=4, max_model_len=128,
             num_kv_pages=256, progress=False) as llm:
        yield llm


def _summary(output):
    return output.prompt_token_ids, output.token_ids, output.text, output.usage.prompt_tokens


def test_equal_to_the_string_prompt(llm):
    ids = llm.tokenizer(TEXT)["input_ids"]
    by_text = llm.generate(TEXT, GREEDY)[0]
    tokenized = llm.generate(TokenizedPrompt(ids, llm.tokenizer), GREEDY)[0]
    assert _summary(tokenized) == _summary(by_text)
    assert by_text.prompt_token_ids == list(ids)  # the string went through the same tokenizer
    async_output = asyncio.run(llm.agenerate(TokenizedPrompt(ids, llm.tokenizer), GREEDY))
    assert _summary(async_output) == _summary(by_text)
    streamed = [d.text for d in llm.stream_deltas(TokenizedPrompt(ids, llm.tokenizer), GREEDY)]
    assert "".join(streamed) == by_text.text


def test_several_in_one_batch_and_the_ids_are_not_modified(llm):
    ids = [llm.tokenizer(f"{TEXT}, {i}")["input_ids"] for i in range(3)]
    copies = [list(x) for x in ids]
    outputs = llm.generate([TokenizedPrompt(x, llm.tokenizer) for x in ids], GREEDY)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in llm.generate(copies, GREEDY)]
    assert ids == copies  # the engine appended its output to its own copy


class OtherTokenizer:
    """Stands for another engine's tokenizer."""


@pytest.mark.parametrize("ids, message", [
    ([1, 2, 10**9], "must be ints in"),
    ([1, -1], "must be ints in"),
    ([1, 2.0], "must be ints in"),
    ([1, True], "must be ints in"),
    ([], "empty"),
])
def test_ids_of_another_tokenizer_are_checked_one_by_one(llm, ids, message):
    with pytest.raises(InvalidRequestError, match=message):
        llm.generate(TokenizedPrompt(ids, OtherTokenizer()), GREEDY)


@pytest.mark.parametrize("ids, message", [([1, 2, 10**9], "must be ints in"), ([-3, 1], "must be ints in"),
                                          ([], "empty")])
def test_own_ids_out_of_the_model_vocabulary_are_refused(llm, ids, message):
    with pytest.raises(InvalidRequestError, match=message):
        llm.generate(TokenizedPrompt(ids, llm.tokenizer), GREEDY)


@pytest.mark.parametrize("token_ids, head, message", [
    ("hello", (), "TokenizedPrompt.token_ids must be a list of ints, got str$"),
    (np.array([1, 2]), (), r"TokenizedPrompt.token_ids must be a list of ints, got ndarray \(convert it with"),
    ([1], np.array([2]), "TokenizedPrompt.head must be a list of ints, got ndarray"),
    ([1, 2.0, 3], (), "must be ints in"),  # min and max alone find nothing wrong
    ([19556.0, 665.5], (), "must be ints in"),
    ([1, "2"], (), "must be ints in"),
    ([1, None], (), "must be ints in"),
    ([1, np.int64(2)], (), "must be ints in"),
])
def test_malformed_ids_are_named(llm, token_ids, head, message):
    for tokenizer in (llm.tokenizer, OtherTokenizer()):
        with pytest.raises(InvalidRequestError, match=message):
            llm.generate(TokenizedPrompt(token_ids, tokenizer, head=head), GREEDY)
    assert llm.generate([1, 2, 3], GREEDY)[0].usage.completion_tokens == GREEDY.max_tokens


def test_ids_of_another_tokenizer_in_range_are_served(llm):
    ids = llm.tokenizer(TEXT)["input_ids"]
    other = llm.generate(TokenizedPrompt(ids, OtherTokenizer()), GREEDY)[0]
    assert other.token_ids == llm.generate(list(ids), GREEDY)[0].token_ids


def test_a_shared_head_gives_what_the_whole_list_gives(llm):
    ids = llm.tokenizer(f"{TEXT}, and the farmers plant rice")["input_ids"]
    head = tuple(ids[:6])
    reference = llm.generate(list(ids), GREEDY)[0]  # the plain list, checked id by id
    for _ in range(2):  # the second prompt meets the remembered head
        split = llm.generate(TokenizedPrompt(ids[6:], llm.tokenizer, head=head), GREEDY)[0]
        assert _summary(split) == _summary(reference)
    only_head = llm.generate(TokenizedPrompt([], llm.tokenizer, head=tuple(ids)), GREEDY)[0]
    assert _summary(only_head) == _summary(reference)
    foreign = llm.generate(TokenizedPrompt(ids[6:], OtherTokenizer(), head=head), GREEDY)[0]
    assert _summary(foreign) == _summary(reference)


@pytest.mark.parametrize("head, rest", [((1, 10**9), [2]), ((1, 2), [-1]), ((-3,), []), ((1, 2.0), [3]),
                                        ((), [])])
def test_bad_ids_in_the_head_or_after_it_are_refused_every_time(llm, head, rest):
    # The reference message: what the same ids as a plain list get.
    with pytest.raises(InvalidRequestError) as plain:
        llm.generate([list(head) + rest], GREEDY)
    for _ in range(2):  # a refused head is not remembered
        with pytest.raises(InvalidRequestError) as split:
            llm.generate(TokenizedPrompt(rest, llm.tokenizer, head=head), GREEDY)
        assert str(split.value) == str(plain.value)
