"""IncrementalDetokenizer against a real byte-level BPE tokenizer (SmolLM2's, embedded in a GGUF file)."""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from braidinfer.detokenizer import IncrementalDetokenizer

IM_END = 2  # <|im_end|>, a special token of this tokenizer


@pytest.fixture(scope="module")
def tok(embedded_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(embedded_gguf), gguf_file=os.path.basename(embedded_gguf))


def stream(tok, ids, prompt_ids=(), **kwargs):
    """Feed ids one by one, flush unless stopped; return (deltas, stopped, tokens consumed, detokenizer)."""
    det = IncrementalDetokenizer(tok, list(prompt_ids), **kwargs)
    deltas, stopped, consumed = [], False, 0
    for token in ids:
        delta, stopped = det.add(token)
        deltas.append(delta)
        consumed += 1
        if stopped:
            break
    if not stopped:
        deltas.append(det.flush())
    return deltas, stopped, consumed, det


def expected_with_stop(full, stop, include):
    """What the stream must produce: the decoded text cut before (or after) the first stop string."""
    cut = full.find(stop)
    if cut < 0:
        return full
    return full[: cut + len(stop)] if include else full[:cut]


TEXTS = [
    "Hello world",
    "  leading spaces and  double  spaces ",
    "line one\nline two\n\n\tindented\r\nwindows",
    "emoji 🙂🎉 skin tone 👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "中文字符测试，日本語のテキスト、한국어 텍스트",
    "naïve café — “quotes” … ½ ∑ x² → ∞",
    "def f(x):\n    return x ** 2  # code\n",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", ["", "User: say something.\nAssistant:"])
def test_deltas_concatenate_to_decode(tok, text, prompt):
    ids = tok.encode(text)
    deltas, stopped, _, det = stream(tok, ids, tok.encode(prompt))
    full = tok.decode(ids)
    assert not stopped
    assert "".join(deltas) == full == det.text
    assert all("\ufffd" not in d for d in deltas)


def test_partial_characters_are_held_back(tok):
    ids = tok.encode("中文字符测试")
    # Precondition: some tokens of this text are fragments of a character's UTF-8 bytes.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas, _, _, _ = stream(tok, ids)
    assert "" in deltas[:-1]
    assert "".join(deltas) == "中文字符测试"


def test_special_tokens_follow_skip_special_tokens(tok):
    ids = tok.encode("before") + [IM_END] + tok.encode(" after")
    for skip in (True, False):
        deltas, _, _, _ = stream(tok, ids, skip_special_tokens=skip)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert "<|im_end|>" in tok.decode(ids, skip_special_tokens=False)


def test_window_stays_short(tok):
    """Each add decodes a bounded window, not the whole output."""
    longest = []

    class Recording:
        def decode(self, ids, **kwargs):
            longest.append(len(ids))
            return tok.decode(ids, **kwargs)

    ids = tok.encode("the quick brown fox 世界 🙂 " * 60)
    det = IncrementalDetokenizer(Recording(), tok.encode("a long prompt " * 50))
    deltas = [det.add(t)[0] for t in ids] + [det.flush()]
    assert len(ids) > 400
    assert max(longest) <= 12
    assert "".join(deltas) == tok.decode(ids)


def test_tokens_without_text_do_not_grow_the_window(tok):
    """Skipped special tokens (EOS repeated under ignore_eos) leave the window instead of being decoded again on
    every later add, and the text around them is what decode gives."""
    windows = []

    class Recording:
        def decode(self, ids, **kwargs):
            windows.append(len(ids))
            return tok.decode(ids, **kwargs)

    ids = tok.encode("Hello") + [IM_END] * 300 + tok.encode(" world 世界")
    deltas, _, _, det = stream(Recording(), ids, tok.encode("Say hi."))
    assert max(windows) <= 12
    assert len(det._ids) <= 12  # what the next add would decode
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == "Hello world 世界"


STOP_TEXT = "The answer is 42.\nEND_OF_ANSWER and then more text"


def test_stop_string_spanning_tokens_is_cut(tok):
    ids = tok.encode(STOP_TEXT)
    stop = "END_OF_ANS"
    # Precondition: no single token holds the whole stop string.
    assert all(stop not in tok.decode([i]) for i in ids)
    deltas, stopped, consumed, det = stream(tok, ids, stop=[stop])
    assert stopped
    assert "".join(deltas) == "The answer is 42.\n" == det.text
    # It stopped at the token that completed the stop string, not later.
    assert stop in tok.decode(ids[:consumed]) and stop not in tok.decode(ids[: consumed - 1])
    # Nothing more comes out after the stop.
    assert det.add(ids[consumed]) == ("", True)
    assert det.flush() == ""


def test_stop_string_included_on_request(tok):
    ids = tok.encode(STOP_TEXT)
    deltas, stopped, _, det = stream(tok, ids, stop=["END_OF_ANS"], include_stop_str_in_output=True)
    assert stopped
    assert "".join(deltas) == "The answer is 42.\nEND_OF_ANS" == det.text


def test_stop_string_inside_one_token(tok):
    ids = tok.encode(STOP_TEXT)
    deltas, stopped, _, _ = stream(tok, ids, stop=["nswe"])
    assert stopped and "".join(deltas) == "The a"


def test_earliest_of_several_stop_strings_wins(tok):
    ids = tok.encode(STOP_TEXT)
    deltas, stopped, _, _ = stream(tok, ids, stop=["more", "42", "answer is"])
    assert stopped and "".join(deltas) == "The "


def test_stop_prefix_that_is_not_a_stop_is_released(tok):
    text = "a <en b <end c <e"
    ids = tok.encode(text)
    det = IncrementalDetokenizer(tok, [], stop=["<end>"])
    emitted = ""
    for token in ids:
        delta, stopped = det.add(token)
        assert not stopped
        emitted += delta
        # Whatever is held back is a possible start of "<end>".
        held = det.text[len(emitted):]
        assert "<end>".startswith(held)
    assert emitted == "a <en b <end c "
    assert det.flush() == "<e"
    assert det.text == text


def test_flush_drops_a_trailing_incomplete_character(tok):
    ids = tok.encode("ok 世")
    assert tok.decode(ids[:-1]).endswith("\ufffd")  # the last token completes the character
    det = IncrementalDetokenizer(tok, [])
    emitted = "".join(det.add(t)[0] for t in ids[:-1])
    assert emitted + det.flush() == "ok "


def test_flush_keeps_text_before_a_trailing_incomplete_character(tok):
    space_and_partial = tok.convert_tokens_to_ids("ĠâĢ")  # " " plus 2 of the 3 bytes of "“"
    ids = tok.encode("ok") + [space_and_partial]
    assert tok.decode(ids) == "ok \ufffd"
    deltas, _, _, _ = stream(tok, ids)
    assert deltas[-2:] == ["", " "] and "".join(deltas) == "ok "


@pytest.mark.parametrize("after", [[], [IM_END]])
def test_flush_keeps_a_trailing_replacement_character(tok, after):
    ids = tok.encode("price: 5\ufffd")
    assert tok.decode(ids[-1:]) == "\ufffd"  # a token of its own, not the start of a character
    deltas, _, _, _ = stream(tok, ids + after)
    assert "".join(deltas) == "price: 5\ufffd"


def test_stray_bytes_inside_the_text_are_released(tok):
    ids = tok.encode("a\U00040000b")  # this vocabulary has no token for the leading byte 0xF1
    assert "\ufffd" in tok.decode(ids)
    deltas, _, _, _ = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids)


def test_prompt_ending_inside_a_character(tok):
    ids = tok.encode("x世界")
    split = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
    deltas, _, _, _ = stream(tok, ids[split:], ids[:split])
    assert "".join(deltas) == tok.decode(ids[split:])


def metaspace_tokenizer():
    """A tiny SentencePiece-style tokenizer: "▁" marks a leading space, dropped at the start of a text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "▁how": 3, "▁are": 4, "?": 5, "</s>": 6}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", eos_token="</s>")


def test_a_skipped_special_token_keeps_the_next_words_space():
    sp = metaspace_tokenizer()
    output = [1] + [6] * 20 + [2, 3]  # "</s>" (special) repeated between two words
    deltas, _, _, det = stream(sp, output)
    assert "".join(deltas) == "Hello world how" == sp.decode(output, skip_special_tokens=True)
    assert len(det._ids) <= 2


def test_first_token_keeps_its_leading_space_after_a_prompt():
    sp = metaspace_tokenizer()
    output = [2, 3, 4, 5]
    assert sp.decode(output) == "world how are?"  # alone, the first word's space is dropped
    deltas, _, _, _ = stream(sp, output, [1])
    assert "".join(deltas) == " world how are?" == sp.decode([1] + output)[len("Hello"):]
    deltas, _, _, _ = stream(sp, output)
    assert "".join(deltas) == "world how are?"


ALPHABET = list("ab xyz #<>/\n.,!é世界の🙂") + ["👍🏽", "ab", "世界", "END"]


@st.composite
def text_and_stop(draw):
    text = "".join(draw(st.lists(st.sampled_from(ALPHABET), min_size=1, max_size=25)))
    start = draw(st.integers(0, len(text) - 1))
    end = draw(st.integers(start + 1, min(len(text), start + 6)))
    return text, text[start:end]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=text_and_stop(), include=st.booleans(), prompt=st.sampled_from(["", "Q: 世界?\nA:", "#"]))
def test_streaming_with_stop_matches_reference(tok, case, include, prompt):
    text, stop = case
    ids = tok.encode(text)
    deltas, stopped, _, det = stream(tok, ids, tok.encode(prompt), stop=[stop], include_stop_str_in_output=include)
    full = tok.decode(ids)
    expected = expected_with_stop(full, stop, include)
    assert "".join(deltas) == expected == det.text
    assert stopped == (stop in full)


@st.composite
def text_and_stops(draw):
    text, first = draw(text_and_stop())
    others = draw(st.lists(st.sampled_from(ALPHABET).map(lambda s: s[:2]) | st.just(first[1:]), max_size=2))
    return text, [first, *others]


def stream_reference(tok, ids, stops, include):
    """Decode growing prefixes until one holds a stop string; cut there (earliest start, then shortest)."""
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k])
        hits = sorted((text.find(s), len(s)) for s in stops if s and s in text)
        if hits:
            start, length = hits[0]
            return text[: start + length] if include else text[:start], True
    return tok.decode(ids).rstrip("\ufffd"), False


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=text_and_stops(), include=st.booleans())
def test_streaming_with_several_stops_matches_reference(tok, case, include):
    text, stops = case
    ids = tok.encode(text)
    deltas, stopped, _, det = stream(tok, ids, stop=stops, include_stop_str_in_output=include)
    expected, expected_stopped = stream_reference(tok, ids, stops, include)
    assert "".join(deltas) == expected == det.text
    assert stopped == expected_stopped


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(codec="utf-8", exclude_characters="\ufffd"), min_size=1, max_size=30))
def test_streaming_arbitrary_unicode_matches_decode(tok, text):
    ids = tok.encode(text)
    deltas, _, _, _ = stream(tok, ids)
    # The vocabulary lacks a few byte tokens, so some characters encode to stray continuation bytes
    # that decode as U+FFFD; at the very end those are indistinguishable from an incomplete
    # character, which flush() drops.
    assert "".join(deltas) == tok.decode(ids).rstrip("\ufffd")
