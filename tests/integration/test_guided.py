"""Grammar-constrained decoding: even a random model's output parses when a constraint is given, checked by parsers
independent of xgrammar (json, re, and a JSON-prefix check written here)."""
from __future__ import annotations

import json
import re

import pytest

from braidinfer import LLM, SamplingParams
from braidinfer.errors import InvalidRequestError
from braidinfer.guided import GuidedDecoding

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"},
                   "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(tmp_path_factory, smollm_tokenizer):
    from tests.conftest import build_tiny_model

    path = tmp_path_factory.mktemp("tiny-guided")
    build_tiny_model("llama", path, smollm_tokenizer, seed=5)
    with LLM(model=str(path), device="cpu", dtype="float32", progress=False) as llm:
        yield llm


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_output_always_validates(llm, seed):
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=120, guided=GuidedDecoding(json_schema=SCHEMA))
    out = llm.generate("Describe a person:", params)[0]
    assert out.finish_reason == "stop", out.text  # the grammar completed (within max_tokens)
    value = json.loads(out.text, strict=False)  # xgrammar lets raw control characters into strings
    assert set(value) == {"name", "age", "tags"} and isinstance(value["age"], int)
    assert len(value["name"]) <= 12 and all(t in ("a", "b") for t in value["tags"])


# A call with up to two arguments, each a number or a call of up to one number: rule references, alternation, character
# classes, optional parts, one level of nesting. Bounded, so a random model completes it well within max_tokens.
CALL_GRAMMAR = r"""
root   ::= call
call   ::= name "(" args? ")"
args   ::= arg ("," arg)?
arg    ::= number | name "(" number? ")"
name   ::= [a-z] [a-z0-9_]?
number ::= "-"? [1-9] [0-9]?
"""
_NAME, _NUMBER = r"[a-z][a-z0-9_]?", r"-?[1-9][0-9]?"
_ARG = rf"(?:{_NUMBER}|{_NAME}\((?:{_NUMBER})?\))"
CALL_REGEX = re.compile(rf"{_NAME}\((?:{_ARG}(?:,{_ARG})?)?\)")
"""CALL_GRAMMAR's language, written as a regular expression (the nesting is bounded)."""


@pytest.mark.parametrize("seed", range(4))
def test_ebnf_grammar_output_parses(llm, seed):
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=40, guided=GuidedDecoding(grammar=CALL_GRAMMAR))
    out = llm.generate("Call a function:", params)[0]
    assert out.finish_reason == "stop", out.text  # the grammar completed
    assert CALL_REGEX.fullmatch(out.text), out.text
    # The same request without the grammar: the random model's text is not in the language.
    free = llm.generate("Call a function:", SamplingParams(temperature=1.0, seed=seed, max_tokens=len(out.token_ids)))
    assert not CALL_REGEX.fullmatch(free[0].text)


def test_regex(llm):
    out = llm.generate("x", SamplingParams(seed=1, max_tokens=20, guided=GuidedDecoding(regex=r"(yes|no)-[0-9]{3}")))[0]
    assert re.fullmatch(r"(yes|no)-[0-9]{3}", out.text)


_STRING_ENDS = ["", '"', 'n"', '0"', '00"', '000"', '0000"']  # close a string, an escape, a \uXXXX escape
_VALUE_ENDS = ["", "0", ":0", '"k":0', "rue", "ue", "e", "alse", "lse", "se", "ull", "ll", "l"]


def _closers(text: str) -> str | None:
    """The brackets that close every container open at the end of `text`; None if it ends inside a string or a
    bracket closes one it does not match."""
    stack, in_string, escaped = [], False, False
    for ch in text:
        if in_string:
            in_string, escaped = (in_string, False) if escaped else (ch != '"', ch == "\\")
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]":
            if not stack or stack.pop() != ch:
                return None
    return None if in_string else "".join(reversed(stack))


def is_json_object_prefix(text: str) -> bool:
    """Whether some text appended to `text` makes a JSON object (json.loads, control characters allowed in strings):
    tries closing an open string or escape, finishing a number, literal or key-value pair, and closing the open
    brackets. Enough for any prefix of compact JSON cut at a token boundary (tested below)."""
    if not text.lstrip().startswith("{"):
        return False
    for end in (a + b for a in _STRING_ENDS for b in _VALUE_ENDS):
        closers = _closers(text + end)
        if closers is None:
            continue
        try:
            if isinstance(json.loads(text + end + closers, strict=False), dict):
                return True
        except ValueError:
            pass
    return False


def test_json_prefix_check_accepts_every_prefix_and_rejects_broken_text():
    value = {"a": [1, -2.5e-3, True, None, {"b\\\"c": "x\u00e9y"}], "de": False, "f": {}}
    doc = json.dumps(value, separators=(",", ":"))  # with escapes \\, \" and \u00e9
    for i in range(1, len(doc) + 1):
        assert is_json_object_prefix(doc[:i]), doc[:i]
    for bad in ['{"a" 1', '{]', 'x{"a":1}', '{"a":1}}', '{"a":1}x', '{"a":tx', '{1:2', '[1]', '{"a":[1}', '{"a":01']:
        assert not is_json_object_prefix(bad), bad


def test_json_object_cut_at_max_tokens_is_a_json_prefix(llm):
    """json_object requests stopped by max_tokens end with finish_reason "length" after exactly max_tokens tokens,
    their text a prefix of a JSON object; those that stopped on their own are whole JSON objects. Of 24 seeds most
    objects close within 12 tokens: the test needs a few that do not, whichever they are."""
    outs = llm.generate(["x"] * 24, [SamplingParams(temperature=1.0, seed=seed, max_tokens=12,
                                                    guided=GuidedDecoding(json_object=True)) for seed in range(24)])
    cut = [out for out in outs if out.finish_reason == "length"]
    assert len(cut) >= 2, [out.text for out in outs]
    for out in cut:
        assert len(out.token_ids) == 12 and is_json_object_prefix(out.text), out.text
    for out in outs:
        if out.finish_reason != "length":
            assert out.finish_reason == "stop" and isinstance(json.loads(out.text), dict), (out.finish_reason, out.text)


def test_json_cut_after_any_token_is_a_json_prefix(llm):
    """A schema-guided object cut after each of its tokens in turn (after a key, a colon, inside a number, an array):
    each cut ends with finish_reason "length" and is a prefix of a JSON object."""
    guided = GuidedDecoding(json_schema=SCHEMA)
    full = llm.generate("Describe a person:", SamplingParams(temperature=1.0, seed=0, max_tokens=120, guided=guided))[0]
    assert full.finish_reason == "stop"
    lengths = range(1, len(full.token_ids))
    cuts = llm.generate(["Describe a person:"] * len(lengths),
                        [SamplingParams(temperature=1.0, seed=0, max_tokens=n, guided=guided) for n in lengths])
    for n, cut in zip(lengths, cuts):
        assert cut.finish_reason == "length" and len(cut.token_ids) == n, (n, cut.finish_reason, cut.text)
        assert is_json_object_prefix(cut.text), cut.text
    assert not is_json_object_prefix(full.text + ",")


def test_json_object_completes_within_enough_tokens(llm):
    out = llm.generate("x", SamplingParams(temperature=0.7, seed=2, max_tokens=60,
                                           guided=GuidedDecoding(json_object=True)))[0]
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text, strict=False), dict)
    else:
        assert out.finish_reason == "length" and is_json_object_prefix(out.text), out.text


def test_bad_constraints_are_clear_errors(llm):
    with pytest.raises(InvalidRequestError, match="exactly one"):
        GuidedDecoding(json_object=True, regex="a")
    with pytest.raises(InvalidRequestError, match="cannot be compiled"):
        llm.generate("x", SamplingParams(guided=GuidedDecoding(grammar="root ::= ")))
    with pytest.raises(InvalidRequestError, match="cannot be compiled"):
        llm.generate("x", SamplingParams(guided=GuidedDecoding(json_schema='{"type": "obj')))
    assert llm.generate("x", SamplingParams(max_tokens=3))[0].usage.completion_tokens == 3


def test_schemas_listing_the_same_properties_in_another_order_keep_their_own_order(llm):
    """A schema's properties are generated in the order it lists them, so two schemas that differ only in that order
    are two grammars (the compiled-grammar cache once keyed them by sorted JSON and served the first to both)."""
    props = {"name": {"type": "string", "maxLength": 4}, "age": {"type": "integer", "maximum": 99}}
    for order in (["name", "age"], ["age", "name"], ["name", "age"]):
        schema = {"type": "object", "properties": {k: props[k] for k in order}, "required": ["name", "age"],
                  "additionalProperties": False}
        out = llm.generate("x", SamplingParams(temperature=1.0, seed=3, max_tokens=40,
                                               guided=GuidedDecoding(json_schema=schema)))[0]
        assert out.finish_reason == "stop" and list(json.loads(out.text, strict=False)) == order, out.text


def test_compiled_grammars_are_kept_for_the_most_recently_used_constraints(llm, monkeypatch):
    """The cache of compiled constraints is bounded: the least recently used is compiled again when asked for."""
    from braidinfer.sampling import guided as compiled

    grammars = compiled.GrammarCompiler(llm.engine.tokenizer, llm.engine.model_config.vocab_size, [0])
    monkeypatch.setattr(compiled, "CACHED_GRAMMARS", 2)
    compiles: list[str] = []
    compile_once = grammars._compile
    monkeypatch.setattr(grammars, "_compile", lambda g: compiles.append(g.regex) or compile_once(g))
    for regex in ["a", "b", "a", "c", "a", "b"]:  # "b" is the least recently used when "c" arrives
        grammars.matcher(GuidedDecoding(regex=regex))
    assert compiles == ["a", "b", "c", "b"]


def test_a_token_the_grammar_forbids_fails_the_request_instead_of_ending_it(llm, monkeypatch):
    """Should a forbidden token ever be sampled (here: the masks switched off), the request fails with an error,
    rather than ending with finish_reason "stop" and text that breaks its constraint; the engine serves on."""
    from braidinfer.errors import BraidError

    monkeypatch.setattr("braidinfer.sampling.logits.apply_token_masks", lambda logits, matchers: None)
    with pytest.raises(BraidError, match="grammar forbids it"):
        llm.generate("x", SamplingParams(temperature=0, max_tokens=8, guided=GuidedDecoding(regex="(yes|no)")))
    monkeypatch.undo()
    out = llm.generate("x", SamplingParams(temperature=0, max_tokens=8, guided=GuidedDecoding(regex="(yes|no)")))[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop"


def test_compile_guided_checks_a_constraint_before_any_request(llm):
    from braidinfer.errors import GrammarCompileError

    llm.compile_guided(GuidedDecoding(regex="(yes|no)"))
    with pytest.raises(GrammarCompileError, match="cannot be compiled"):
        llm.compile_guided(GuidedDecoding(regex="(yes"))
    with pytest.raises(InvalidRequestError, match="guided must be a GuidedDecoding, got str"):
        llm.compile_guided("(yes|no)")
