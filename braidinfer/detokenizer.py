"""Turns generated token ids into text one token at a time, and finds stop strings in it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# How many prompt tokens to decode in front of the first generated ones: SentencePiece-style
# tokenizers drop the leading space of a sequence's first word, so the first generated token needs
# some text before it to decode as it does in context.
_PROMPT_CONTEXT_TOKENS = 5

# What a decoder yields for bytes that do not (yet) form a complete UTF-8 sequence.
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Streaming text for one request.

    Each `add` decodes only a short window of recent ids (the prefix_offset/read_offset technique of
    HF TextStreamer and vLLM): the window from prefix_offset decodes to text already emitted up to
    read_offset, and whatever the whole window decodes to beyond that is new. Cost per token is
    O(1) in the length of the output.

    Text is released only when final: never while it ends in an incomplete UTF-8 sequence, and never
    while it could still be the beginning of a stop string. The concatenation of every delta and
    `flush()` is the text the output ids add after the prompt's last few tokens (`context`, at most
    `_PROMPT_CONTEXT_TOKENS`): `decode(context + output_ids)` less `decode(context)`, both with
    `skip_special_tokens=...`, less a trailing incomplete character. For byte-level BPE tokenizers
    that is `decode(output_ids)`; for SentencePiece-style decoders that drop the leading space of a
    text, the first word keeps the space it has after the prompt, so that a client joining prompt
    and deltas gets what decoding both gives.
    The text is cut at the first token after which it holds a stop string: before the stop string
    (after it with include_stop_str_in_output); when one token completes several, at the one that
    starts first, and of those starting together the shortest.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = [s for s in stop if s]
        self._include_stop = include_stop_str_in_output
        # ids[prefix_offset:read_offset] decode to text that was already taken from the decoder.
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        if self._decode(self._ids).endswith(_REPLACEMENT):
            # The prompt ends inside a character; context would glue its bytes to the output's.
            self._ids = []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        # Emitted pieces, joined only when `text` is read: appending to one growing str would copy
        # the whole text on every token.
        self._emitted: list[str] = []
        # Decoded text held back because it may be the start of a stop string.
        self._pending = ""
        self._stopped = False

    @property
    def text(self) -> str:
        """Text emitted so far plus text held back as a possible stop prefix (cut once stopped)."""
        return "".join(self._emitted) + self._pending

    @property
    def stopped(self) -> bool:
        """True once a stop string was found; later tokens are ignored."""
        return self._stopped

    def add(self, token_id: int) -> tuple[str, bool]:
        """Feed one generated token; return (text now safe to emit, whether a stop string ended the text)."""
        if self._stopped:
            return "", True
        self._ids.append(token_id)
        return self._release(self._decode_new())

    def flush(self) -> str:
        """Release all held-back text, for a request that finished other than by a stop string.

        A trailing incomplete UTF-8 sequence is dropped (with any stray bytes just before it: all decode to U+FFFD);
        a whole U+FFFD character at the end is kept. Returns "" once stopped.
        """
        if self._stopped:
            return ""
        prefix, full = self._decode_window()
        tail = full[len(prefix) :]
        if not self._ends_in_replacement_character():
            tail = tail.rstrip(_REPLACEMENT)
        self._prefix_offset = self._read_offset = len(self._ids)
        delta, _ = self._release(tail)
        delta += self._pending
        self._emitted.append(self._pending)
        self._pending = ""
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _ends_in_replacement_character(self) -> bool:
        """Whether the last unread id with text ends in a whole U+FFFD character (SmolLM2's vocabulary has it as a
        token), not in an incomplete one: its text, encoded again, gives that id back, where the text of a
        character's first bytes (U+FFFD too) encodes to the ids of U+FFFD's own bytes."""
        for token in reversed(self._ids[self._read_offset :]):
            text = self._decode([token])
            if text:
                return text.endswith(_REPLACEMENT) and self._tokenizer.encode(text, add_special_tokens=False) == [token]
        return False

    def _decode_window(self) -> tuple[str, str]:
        """(text of ids[prefix_offset:read_offset], text of ids[prefix_offset:])."""
        return (self._decode(self._ids[self._prefix_offset : self._read_offset]),
                self._decode(self._ids[self._prefix_offset :]))

    def _decode_new(self) -> str:
        """Text the unread ids add, or "" while it would end in an incomplete character."""
        prefix, full = self._decode_window()
        if full == prefix:
            # Ids that add no text (special tokens skipped, e.g. EOS repeated under ignore_eos) leave the window, as
            # the decoder drops them: kept, every later add would decode all of them again. The next token is read
            # after the same text as before them (not after them alone, which would cost a SentencePiece-style
            # decoder the next word's leading space).
            del self._ids[self._read_offset :]
            return ""
        new = full[len(prefix) :]
        if not new or new.endswith(_REPLACEMENT):
            # Keep the ids unread: the next token may complete the character.
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        # Forget ids that no window will decode again, so the list stays short.
        del self._ids[: self._prefix_offset]
        self._read_offset -= self._prefix_offset
        self._prefix_offset = 0
        return new

    def _release(self, new_text: str) -> tuple[str, bool]:
        """Append decoded text; return what is safe to emit and whether a stop string was found."""
        pending = self._pending + new_text
        cut = self._stop_cut(pending)
        if cut is not None:
            self._stopped = True
            release, self._pending = pending[:cut], ""
        else:
            held = self._stop_prefix_length(pending)
            release, self._pending = pending[: len(pending) - held], pending[len(pending) - held :]
        if release:
            self._emitted.append(release)
        return release, self._stopped

    def _stop_cut(self, text: str) -> int | None:
        """Where to cut `text` at its earliest-starting stop string, or None when it holds none."""
        best: tuple[int, int] | None = None
        for stop in self._stop:
            start = text.find(stop)
            if start >= 0 and (best is None or (start, len(stop)) < best):
                best = (start, len(stop))
        if best is None:
            return None
        start, length = best
        return start + length if self._include_stop else start

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that some stop string starts with."""
        longest = min(len(text), max((len(s) - 1 for s in self._stop), default=0))
        for length in range(longest, 0, -1):
            suffix = text[-length:]
            if any(stop.startswith(suffix) for stop in self._stop):
                return length
        return 0
