"""SamplingParams: accepted values, rejected values (as InvalidRequestError naming the field), normalisation."""

import math

import pytest

from braidinfer.errors import BraidError, InvalidRequestError
from braidinfer.sampling_params import SamplingParams


def test_defaults():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (1.0, 0, 1.0, 0.0)
    assert p.seed is None and p.max_tokens == 256 and p.logprobs is None
    assert p.stop == [] and p.stop_token_ids == []
    assert p.ignore_eos is False and p.skip_special_tokens is True and p.include_stop_str_in_output is False
    assert p.greedy is False


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", 0.0), ("temperature", 0), ("temperature", 2.5),
        ("top_k", -1), ("top_k", 0), ("top_k", 1), ("top_k", 50),
        ("top_p", 1.0), ("top_p", 1e-6), ("top_p", 0.5),
        ("min_p", 0.0), ("min_p", 1.0), ("min_p", 0.05),
        ("seed", None), ("seed", 0), ("seed", -5), ("seed", 2**63 - 1), ("seed", -(2**63)),
        ("max_tokens", 1), ("max_tokens", 100_000),
        ("logprobs", None), ("logprobs", 0), ("logprobs", 20),
        ("stop_token_ids", [0, 2, 49151]),
        ("ignore_eos", True), ("skip_special_tokens", False), ("include_stop_str_in_output", True),
    ],
)
def test_valid_values_are_kept(field, value):
    p = SamplingParams(**{field: value})
    assert getattr(p, field) == value


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "hot"),
        ("top_k", -2), ("top_k", 1.5), ("top_k", True),
        ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5), ("top_p", math.nan), ("top_p", -math.inf),
        ("min_p", -0.01), ("min_p", 1.5), ("min_p", math.nan), ("min_p", math.inf),
        ("seed", 2**63), ("seed", -(2**63) - 1), ("seed", 1.0),
        ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.0),
        ("stop", [1]), ("stop", 3),
        ("stop_token_ids", [-1]), ("stop_token_ids", ["a"]), ("stop_token_ids", 5),
        ("logprobs", -1), ("logprobs", 21), ("logprobs", True),
        ("ignore_eos", "yes"), ("skip_special_tokens", 2), ("include_stop_str_in_output", None),
    ],
)
def test_invalid_values_raise_request_error_naming_the_field(field, value):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{field: value})
    assert isinstance(info.value, BraidError) and isinstance(info.value, ValueError)
    assert repr(field) in str(info.value)


@pytest.mark.parametrize(
    "field, value, allowed",
    [("temperature", -1, ">= 0"), ("top_p", 2.0, "(0, 1]"), ("min_p", 2.0, "[0, 1]"),
     ("logprobs", 99, "[0, 20]"), ("max_tokens", 0, ">= 1"), ("top_k", -7, ">= 1")],
)
def test_error_message_names_the_allowed_range(field, value, allowed):
    with pytest.raises(InvalidRequestError, match=field) as info:
        SamplingParams(**{field: value})
    assert allowed in str(info.value)


def test_every_invalid_field_is_reported():
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(temperature=-1, top_p=3.0)
    assert "'temperature'" in str(info.value) and "'top_p'" in str(info.value)


def test_unknown_field_is_rejected():
    with pytest.raises(InvalidRequestError, match="'best_of'"):
        SamplingParams(best_of=0.5)


def test_model_validate_paths_raise_request_error():
    with pytest.raises(InvalidRequestError, match="'temperature'"):
        SamplingParams.model_validate({"temperature": -2})
    with pytest.raises(InvalidRequestError, match="'top_k'"):
        SamplingParams.model_validate_json('{"top_k": -3}')
    p = SamplingParams.model_validate_json('{"temperature": 0, "stop": "END", "logprobs": 3}')
    assert p.temperature == 0.0 and p.stop == ["END"] and p.logprobs == 3


def test_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop=None).stop == []


def test_empty_stop_strings_are_dropped():
    assert SamplingParams(stop=["", "x", ""]).stop == ["x"]
    assert SamplingParams(stop="").stop == []


def test_greedy_property():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.0, top_k=40).greedy
    assert not SamplingParams(temperature=0.7).greedy
    assert not SamplingParams(temperature=1e-3).greedy


def test_params_are_frozen_and_say_how_to_change_them():
    p = SamplingParams()
    with pytest.raises(AttributeError, match=r"SamplingParams is immutable: .*model_copy\(update=\{'temperature'"):
        p.temperature = 0.5
    with pytest.raises(AttributeError, match="SamplingParams has no field 'temprature'"):
        p.temprature = 0.5
    with pytest.raises(AttributeError, match="its field 'top_k' cannot be deleted"):
        del p.top_k
    assert (p.temperature, p.top_k) == (1.0, SamplingParams().top_k) and not hasattr(p, "temprature")


def test_model_copy_checks_what_it_changes():
    from braidinfer.guided import GuidedDecoding

    base = SamplingParams(temperature=0.5, stop=["x"], guided=GuidedDecoding(json_object=True))
    copy = base.model_copy(update={"max_tokens": 7, "guided": None, "stop": []})
    assert (copy.max_tokens, copy.guided, copy.stop, copy.temperature) == (7, None, [], 0.5)
    assert base.model_copy() == base and base.max_tokens != 7
    for update, message in [({"temperature": -5}, "'temperature' must be"), ({"top_p": 0.0}, "'top_p' must be"),
                            ({"bogus": 1}, "unknown sampling parameter 'bogus'")]:
        with pytest.raises(InvalidRequestError, match=message):
            base.model_copy(update=update)
