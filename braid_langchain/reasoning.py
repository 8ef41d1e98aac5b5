"""Reasoning models (Qwen3, DeepSeek-R1-distill, QwQ) think inside `<think>...</think>` before they answer.

A model is taken to think in that format when its chat template mentions `</think>` (each of these templates strips
earlier turns' thoughts with it) and its tokenizer has `</think>` as one token. Its chat template may open the
thought itself (the generation prompt ends with `<think>\\n`: R1-distill, QwQ), or leave that to the model (Qwen3).

`ThoughtSplitter` splits the streamed reply into the thought and the answer, whatever the deltas' boundaries (a tag
split across deltas is held back until it is decided); the thought never reaches `content`. It also counts the
thought's tokens (tags included) from the deltas' token ids, for `output_token_details["reasoning"]`. Pure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_SEPARATOR = "\n\n"
"""What the templates put between `</think>` and the answer; written after a thought the engine closes."""


@dataclass(frozen=True)
class ReasoningFormat:
    """How one model's thoughts are delimited. `close_token_id`: the id of the single token `close`."""

    open: str
    close: str
    close_token_id: int


def reasoning_format(tokenizer: Any) -> ReasoningFormat | None:
    """The model's reasoning format, or None when it does not think in `<think>` blocks."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or THINK_CLOSE not in template:
        return None
    ids = tokenizer(THINK_CLOSE, add_special_tokens=False)["input_ids"]
    return ReasoningFormat(THINK_OPEN, THINK_CLOSE, ids[0]) if len(ids) == 1 else None


def template_kwargs(reasoning: bool | None) -> dict[str, Any]:
    """Chat-template arguments for ChatBraid's `reasoning`: Qwen3's `enable_thinking` (templates that do not know it
    ignore it); None keeps the template's default."""
    return {} if reasoning is None else {"enable_thinking": reasoning}


def prompt_opens_thought(tokenizer: Any, prompt: list[int], fmt: ReasoningFormat) -> bool:
    """Whether the rendered prompt ends inside an open thought (`...<think>\\n`), so the reply starts thinking."""
    tail = tokenizer.decode(prompt[-4:], skip_special_tokens=False).rstrip()
    return tail.endswith(fmt.open)


class ThoughtSplitter:
    """Feed reply text (and token ids) as it arrives; get back (thought, answer) text that is final.

    States: "start" (only whitespace so far; a leading `<think>` opens a thought, anything else is the answer),
    "lead" (in a thought, dropping its leading whitespace), "think", "gap" (after `</think>`, dropping the
    whitespace before the answer), "answer". Whitespace at the end of a thought is held back and dropped.
    """

    def __init__(self, fmt: ReasoningFormat, *, opened: bool = False):
        self.fmt = fmt
        self._state = "lead" if opened else "start"
        self._buf = ""
        self._opened = opened
        self.num_tokens = 0
        """Tokens of the thought so far, `<think>` and `</think>` included (0 when the reply has none)."""
        self._closed = False

    @property
    def thinking(self) -> bool:
        """Whether the reply is (possibly) still inside its thought."""
        return self._state in ("start", "lead", "think")

    def feed(self, text: str, token_ids: list[int] = ()) -> tuple[str, str]:
        self._count(token_ids)
        self._buf += text
        thought: list[str] = []
        answer: list[str] = []
        while self._step(thought, answer):
            pass
        return "".join(thought), "".join(answer)

    def finish(self) -> tuple[str, str]:
        """What is still held back at the end of the reply (a thought cut short keeps its text as thought)."""
        buf, state, self._buf = self._buf, self._state, ""
        if state == "start":
            self.num_tokens = 0
            return "", buf.strip()
        if state in ("lead", "think"):
            return buf.rstrip() if state == "think" else buf.strip(), ""
        return "", buf.lstrip() if state == "gap" else buf

    def _count(self, token_ids: list[int]) -> None:
        for token in token_ids:
            if self._closed:
                return
            self.num_tokens += 1
            self._closed = token == self.fmt.close_token_id

    def _step(self, thought: list[str], answer: list[str]) -> bool:
        state, fmt = self._state, self.fmt
        if state == "start":
            head = self._buf.lstrip()
            if not head or (len(head) < len(fmt.open) and fmt.open.startswith(head)):
                return False
            if head.startswith(fmt.open):
                self._buf, self._state = head[len(fmt.open):], "lead"
            else:
                self._state, self.num_tokens, self._closed = "answer", 0, True
            return True
        if state == "lead":
            self._buf = self._buf.lstrip()
            if self._buf:
                self._state = "think"
            return bool(self._buf)
        if state == "think":
            i = self._buf.find(fmt.close)
            if i >= 0:
                _add(thought, self._buf[:i].rstrip())
                self._buf, self._state = self._buf[i + len(fmt.close):], "gap"
                return True
            keep = _partial_suffix_len(self._buf, fmt.close)
            body = self._buf[:len(self._buf) - keep]
            stripped = body.rstrip()
            _add(thought, stripped)
            self._buf = self._buf[len(stripped):]
            return False
        if state == "gap":
            self._buf = self._buf.lstrip()
            if self._buf:
                self._state = "answer"
            return bool(self._buf)
        _add(answer, self._buf)
        self._buf = ""
        return False


def _add(pieces: list[str], text: str) -> None:
    if text:
        pieces.append(text)


def _partial_suffix_len(buf: str, tag: str) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of `tag`."""
    for k in range(min(len(buf), len(tag) - 1), 0, -1):
        if buf.endswith(tag[:k]):
            return k
    return 0
