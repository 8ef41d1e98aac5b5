"""Penalties against plain references: transformers' logits processor and a hand-computed loop."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from braidinfer.errors import InvalidRequestError
from braidinfer.sampling.penalties import apply_penalties
from braidinfer.sampling_params import SamplingParams


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(0)
    logits = torch.randn(2, 50)
    history = [[3, 7, 7, 20], [1, 2]]
    ours = logits.clone()
    apply_penalties(ours, [SamplingParams(repetition_penalty=1.7), SamplingParams()], history, [2, 1])
    ref = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([history[0]]), logits[:1].clone())
    assert torch.allclose(ours[0], ref[0])
    assert torch.equal(ours[1], logits[1])  # no penalty: untouched


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.zeros(1, 10)
    prompt, output = [4, 4, 5], [5, 6, 6, 6]
    apply_penalties(logits, [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)], [prompt + output], [3])
    expected = torch.zeros(10)
    for token in set(output):
        expected[token] -= 0.5 + 0.25 * output.count(token)
    assert torch.allclose(logits[0], expected)  # token 4 (prompt only) is not penalised


def test_penalty_ranges_are_validated():
    with pytest.raises(InvalidRequestError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0.0)
    with pytest.raises(InvalidRequestError, match="frequency_penalty"):
        SamplingParams(frequency_penalty=3.0)


@pytest.mark.parametrize("penalty, bound", [(1e-46, 1e-6), (1e39, 1e6)])
def test_repetition_penalties_beyond_float32_act_as_the_nearest_bound(penalty, bound):
    """1e-46 is 0 in float32 (a positive seen logit divided by it: inf) and 1e39 infinite (a seen logit of 0 times
    it: NaN); each acts as the bound of [1e-6, 1e6], as transformers computes it in float64."""
    logits = torch.tensor([[2.0, 0.0, -1.5, 3.0]])
    apply_penalties(logits, [SamplingParams(repetition_penalty=penalty)], [[0, 1, 2]], [3])
    values = torch.tensor([[2.0, 0.0, -1.5, 3.0]], dtype=torch.float64)
    reference = RepetitionPenaltyLogitsProcessor(bound)(torch.tensor([[0, 1, 2]]), values)
    assert logits.isfinite().all()
    assert torch.allclose(logits.double(), reference, rtol=1e-6)
