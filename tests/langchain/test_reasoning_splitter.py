"""The streamed reply of a reasoning model split into thought and answer, whatever the deltas' boundaries, and the
ReplyBuilder putting the thought in `reasoning_content` (LangChain's reasoning blocks), never in `content`."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from braid_langchain.reasoning import ReasoningFormat, ThoughtSplitter, prompt_opens_thought, reasoning_format
from braid_langchain.streaming import ReplyBuilder

CLOSE_ID = 7
FMT = ReasoningFormat("<think>", "</think>", CLOSE_ID)


def split_whole(text: str, opened: bool = False) -> tuple[str, str]:
    """The reference: (thought, answer) of a whole reply, by string operations (no state machine)."""
    if not opened:
        stripped = text.lstrip()
        if not stripped.startswith("<think>"):
            return "", text.strip() if not stripped else text
        text = stripped[len("<think>"):]
    thought, closed, answer = text.partition("</think>")
    return thought.strip(), answer.lstrip() if closed else ""


def feed_all(pieces: list[str], opened: bool = False) -> tuple[str, str]:
    splitter = ThoughtSplitter(FMT, opened=opened)
    thought, answer = "", ""
    for piece in pieces:
        t, a = splitter.feed(piece)
        thought, answer = thought + t, answer + a
    t, a = splitter.finish()
    return thought + t, answer + a


def cuts(text: str):
    return st.lists(st.integers(0, len(text)), max_size=8).map(
        lambda points: [text[i:j] for i, j in zip([0, *sorted(points)], [*sorted(points), len(text)])])


REPLIES = [
    "<think>\nThe user greets me.\n</think>\n\nHello there!",
    "  <think>a < b, so </thi is not a tag</think>Answer <think> is text here",
    "<think>\n\n</think>\n\nNo thought.",
    "Just an answer, <think> not at the start.",
    "<think>\ncut short by max_tokens, never closed",
    "<thi",
    "",
]


@given(st.sampled_from(REPLIES).flatmap(lambda text: st.tuples(st.just(text), cuts(text))), st.booleans())
def test_any_split_into_deltas_gives_the_same_thought_and_answer(case, opened):
    text, pieces = case
    if opened:
        text = text.removeprefix("<think>")
        pieces = [text]  # compared to the whole text below; splits of the opened text checked next
    assert "".join(pieces) == text
    assert feed_all(pieces, opened) == feed_all([text], opened) == split_whole(text, opened)


@given(st.sampled_from(REPLIES).flatmap(cuts))
def test_a_prompt_opened_thought_splits_the_same_for_any_deltas(pieces):
    text = "".join(pieces)
    assert feed_all(pieces, opened=True) == split_whole(text, opened=True)


def test_thought_tokens_are_counted_up_to_the_close_token():
    splitter = ThoughtSplitter(FMT)
    splitter.feed("<think>ab", [1, 2, 3])
    splitter.feed("c</think>\n\nHi", [4, CLOSE_ID, 9, 10])
    splitter.feed(" there", [11])
    assert splitter.num_tokens == 5
    no_thought = ThoughtSplitter(FMT)
    no_thought.feed("Hi", [1])
    no_thought.finish()
    assert no_thought.num_tokens == 0


@dataclass
class Usage:
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: list = field(default_factory=list)


def test_reply_builder_puts_the_thought_in_reasoning_content_streamed_and_collected():
    deltas = [Delta("<think>\nPlan", [1, 2, 3]), Delta(" it.\n</th", [4, 5]), Delta("ink>\n\nDone", [CLOSE_ID, 8, 9]),
              Delta(".", [10], "stop", Usage(5, 0, 9))]
    streamed = ReplyBuilder("m")
    streamed.thoughts = ThoughtSplitter(FMT)
    chunks = [c for d in deltas for c in streamed.add(d)]
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c
    collected = ReplyBuilder("m")
    collected.thoughts = ThoughtSplitter(FMT)
    for d in deltas:
        collected.collect(d)
    for message in (merged.message, collected.collected().message, collected.result().generations[0].message):
        assert message.content == "Done."
        assert message.additional_kwargs == {"reasoning_content": "Plan it."}
        assert message.usage_metadata["output_token_details"] == {"reasoning": 6}
        assert message.content_blocks[0] == {"type": "reasoning", "reasoning": "Plan it."}
        assert message.content_blocks[1]["type"] == "text" and message.content_blocks[1]["text"] == "Done."


def test_tool_calls_are_parsed_in_the_answer_only():
    builder = ReplyBuilder("m", "auto")
    builder.thoughts = ThoughtSplitter(FMT)
    builder.collect(Delta('<think>maybe {"name": "x", "arguments": {}}</think>\n\n', [1, CLOSE_ID]))
    builder.collect(Delta('<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>', [3], "stop",
                          Usage(3, 0, 3)))
    message = builder.collected().message
    assert message.additional_kwargs["reasoning_content"] == 'maybe {"name": "x", "arguments": {}}'
    assert [(c["name"], c["args"]) for c in message.tool_call_chunks] == [("f", '{"a": 1}')]


def test_the_format_comes_from_the_template_and_the_prompt_may_open_the_thought():
    from qwen3_fixture import build_qwen3_tokenizer

    tok = build_qwen3_tokenizer()
    fmt = reasoning_format(tok)
    assert fmt is not None and fmt.close_token_id == tok.convert_tokens_to_ids("</think>")
    chat = [{"role": "user", "content": "Hi"}]
    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    thinking = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    silent = tok.apply_chat_template(chat, add_generation_prompt=True, enable_thinking=False, tokenize=False)
    assert not prompt_opens_thought(tok, ids(thinking), fmt)  # Qwen3 leaves <think> to the model
    assert silent.endswith("</think>\n\n") and not prompt_opens_thought(tok, ids(silent), fmt)  # or closes it
    r1_style = ids(thinking + "<think>\n")
    assert prompt_opens_thought(tok, r1_style, fmt)  # R1-distill's templates open it
    tok.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert reasoning_format(tok) is None


def test_a_reply_in_two_phases_keeps_one_deadline(monkeypatch):
    """A thinking budget splits the reply into two engine requests; `timeout` bounds both together."""
    from dataclasses import replace

    from braid_langchain import thinking
    from braid_langchain.reasoning import ReasoningFormat
    from braidinfer import SamplingParams
    from braidinfer.outputs import Usage

    clock = [100.0]
    monkeypatch.setattr(thinking, "monotonic", lambda: clock[0])
    timeouts = []

    class Tokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [9]}

        def decode(self, ids):
            return "x" * len(ids)

    class Engine:  # each request takes 0.4 s of the fake clock; phase 1 spends its thought budget
        tokenizer = Tokenizer()

        def stream_deltas(self, prompt, params, timeout=None):
            timeouts.append(timeout)
            clock[0] += 0.4
            usage = Usage(len(prompt), 0, params.max_tokens)
            yield replace(thinking._Delta("x", [1] * params.max_tokens, "length"), usage=usage)

    budget = thinking.ThoughtBudget(ReasoningFormat("<think>", "</think>", 7), 4)
    deltas = list(thinking.stream_deltas(Engine(), [1, 2], SamplingParams(max_tokens=32), budget, timeout=1.0))
    assert len(deltas) == 3  # the thought, the closing text, the answer
    assert timeouts == [1.0, pytest.approx(0.6)]
