"""Grammar-constrained decoding: even a random model's output parses when a constraint is given."""
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


def test_regex_and_json_object(llm):
    out = llm.generate("x", SamplingParams(seed=1, max_tokens=20, guided=GuidedDecoding(regex=r"(yes|no)-[0-9]{3}")))[0]
    assert re.fullmatch(r"(yes|no)-[0-9]{3}", out.text)
    out = llm.generate("x", SamplingParams(temperature=0.7, seed=2, max_tokens=60,
                                           guided=GuidedDecoding(json_object=True)))[0]
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text, strict=False), dict)
    else:  # cut at max_tokens: still a valid JSON prefix starting an object
        assert out.text.lstrip().startswith("{")


def test_bad_constraints_are_clear_errors(llm):
    with pytest.raises(InvalidRequestError, match="exactly one"):
        GuidedDecoding(json_object=True, regex="a")
    with pytest.raises(InvalidRequestError, match="cannot be compiled"):
        llm.generate("x", SamplingParams(guided=GuidedDecoding(grammar="root ::= ")))
    with pytest.raises(InvalidRequestError, match="cannot be compiled"):
        llm.generate("x", SamplingParams(guided=GuidedDecoding(json_schema='{"type": "obj')))
    assert llm.generate("x", SamplingParams(max_tokens=3))[0].usage.completion_tokens == 3
