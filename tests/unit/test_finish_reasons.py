"""The finish reason of a request that reaches max_tokens while its detokenizer holds text back: the text released
then may complete a stop string, which cuts it, and the request then ended by that stop, not by its length."""
from __future__ import annotations

import pytest

from braidinfer.detokenizer import IncrementalDetokenizer
from braidinfer.postprocess import OutputProcessor
from braidinfer.sampling_params import SamplingParams
from braidinfer.sequence import Sequence

X, SPACE_AND_HALF_AN_EMOJI = 104, 40303  # "x"; " " and the first bytes of U+1F600 (decoded alone: " " + U+FFFD)


class _Scheduler:
    def finish(self, seq, reason):
        seq.finish_reason = reason


@pytest.mark.parametrize("stop, text, reason", [([], "x ", "length"), (["x "], "", "stop"), (["y"], "x ", "length")])
def test_text_released_at_max_tokens_that_completes_a_stop_string_ends_by_the_stop(smollm_tokenizer, stop, text,
                                                                                     reason):
    tok = smollm_tokenizer
    assert tok.decode([X, SPACE_AND_HALF_AN_EMOJI]).startswith("x \ufffd")  # the premise: the space is held back
    prompt = tok("Say:", add_special_tokens=False)["input_ids"]
    params = SamplingParams(stop=stop, max_tokens=2)
    deltas = []
    seq = Sequence("r", prompt, params, 2, sink=deltas.append)
    seq.detokenizer = IncrementalDetokenizer(tok, prompt, stop=params.stop)
    output = OutputProcessor(_Scheduler(), {}, frozenset({tok.eos_token_id}), 8192)
    for token in (X, SPACE_AND_HALF_AN_EMOJI):
        output.append(seq, token, None)
    assert "".join(d.text for d in deltas) == text
    assert deltas[-1].finish_reason == reason
