"""The end-to-end checks of tests/support/numerics.py, fed the failures they exist to catch (and accepting what bf16
rounding alone gives): a logprob error of 11 nats where transformers' is 5.7, 3 of 16 first greedy tokens agreeing,
2 of 4 continuations differing, logprobs several nats off, and greedy paths parting where there is no near-tie.

The logprob arrays are those of a random distribution over 1,000 tokens with the logit spread of the gentle GPU test
models (std ~3.3 nats, tests/gpu/test_gpu_parity.py), perturbed by bf16-sized noise (0.05 nats) or by a bug."""
from __future__ import annotations

import pytest
import torch

from tests.support.numerics import (
    assert_error_like_reference,
    assert_greedy_agreement,
    assert_mostly_identical,
    assert_same_greedy,
)

TOL = 0.5  # DEFAULT_PATH_TOL of tests/gpu/test_gpu_parity.py
NUM_STEPS, VOCAB, TOP = 16, 1000, 5


def _greedy_run(logits: torch.Tensor):
    """Greedy tokens and per-step top-5 {token: logprob} of a sequence of next-token logits [steps, vocab]."""
    logprobs = logits.log_softmax(-1)
    top = logprobs.topk(TOP, dim=-1)
    tokens = top.indices[:, 0].tolist()
    return tokens, [dict(zip(i.tolist(), v.tolist())) for i, v in zip(top.indices, top.values)]


@pytest.fixture
def logits():
    return torch.randn(NUM_STEPS, VOCAB, generator=torch.Generator().manual_seed(0)) * 3.3


def _noise(logits, scale, seed=1):
    return logits + scale * torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))


def test_same_greedy_accepts_rounding_noise(logits):
    want, got = _greedy_run(logits), _greedy_run(_noise(logits, 0.05))
    assert_same_greedy(*want, *got, TOL)


def test_same_greedy_accepts_a_parting_at_a_near_tie(logits):
    logits[5, :2] = logits[5].max() + torch.tensor([0.1, 0.0])  # tokens 0 and 1 nearly tied at step 5
    other = logits.clone()
    other[5, 1] += 0.2  # rounding flips the tie: from here on the contexts differ
    other[6:] = torch.randn(NUM_STEPS - 6, VOCAB, generator=torch.Generator().manual_seed(3)) * 3.3
    want, got = _greedy_run(logits), _greedy_run(other)
    assert want[0][5] == 0 and got[0][5] == 1
    assert_same_greedy(*want, *got, TOL)


@pytest.mark.parametrize("offset", [1.0, 3.0, 11.0])
def test_same_greedy_rejects_logprobs_several_nats_off(logits, offset):
    """A bug that moves the logits of a few top tokens by `offset` nats without changing the greedy choice."""
    bad = logits.clone()
    second = logits.topk(2, dim=-1).indices[:, 1]
    bad[torch.arange(NUM_STEPS), second] -= offset
    want, got = _greedy_run(logits), _greedy_run(bad)
    assert got[0] == want[0]
    with pytest.raises(AssertionError, match="logprobs differ"):
        assert_same_greedy(*want, *got, TOL)


def test_same_greedy_rejects_a_different_distribution(logits):
    """Attending to a wrong page or position: the distribution of another context altogether."""
    want, got = _greedy_run(logits), _greedy_run(_noise(logits, 3.3))
    with pytest.raises(AssertionError):
        assert_same_greedy(*want, *got, TOL)


def test_same_greedy_rejects_a_parting_without_a_tie(logits):
    bad = logits.clone()
    bad[4] = logits[4].roll(7)  # step 4 picks another token, far from a tie; its top tokens differ too
    want, got = _greedy_run(logits), _greedy_run(bad)
    got[1][4] = want[1][4]  # even with identical logprobs reported, the choice itself is not a near-tie
    with pytest.raises(AssertionError, match="not a near-tie"):
        assert_same_greedy(*want, *got, TOL)


def test_same_greedy_rejects_a_short_continuation(logits):
    want, got = _greedy_run(logits), _greedy_run(logits[:-1])
    with pytest.raises(AssertionError, match="tokens"):
        assert_same_greedy(*want, *got, TOL)


def test_error_like_reference():
    assert_error_like_reference(0.3, 0.25, abs_tol=1.0)
    assert_error_like_reference(0.12, 0.01, abs_tol=1.0)  # near zero: the 0.1 floor
    with pytest.raises(AssertionError, match="more than"):
        assert_error_like_reference(11.0, 5.7, abs_tol=1.0)  # passed the old 2 * hf_err + 0.02
    with pytest.raises(AssertionError, match="against the reference"):
        assert_error_like_reference(0.9, 0.2, abs_tol=1.0)


def _continuations(num_prompts, agree_first, length=32, agree_len=20, seed=0):
    """`exact` continuations and others that equal them for `agree_len` tokens on `agree_first` prompts and differ
    from the first token on the rest."""
    g = torch.Generator().manual_seed(seed)
    exact = torch.randint(0, 1000, (num_prompts, length), generator=g)
    other = exact.clone()
    other[:, agree_len:] += 1
    other[agree_first:, :] += 1
    return exact.tolist(), other.tolist()


def test_greedy_agreement():
    exact, hf16 = _continuations(16, agree_first=13, agree_len=8)
    _, ours = _continuations(16, agree_first=14, agree_len=7)
    assert_greedy_agreement(ours, hf16, exact, min_first_fraction=0.5)
    _, ours = _continuations(16, agree_first=3, agree_len=32)  # 3 of 16 first tokens, long where they agree
    with pytest.raises(AssertionError, match="first tokens"):
        assert_greedy_agreement(ours, hf16, exact, min_first_fraction=0.5)
    _, ours = _continuations(16, agree_first=16, agree_len=2)  # every first token, but parting right after
    with pytest.raises(AssertionError, match="mean identical prefix"):
        assert_greedy_agreement(ours, hf16, exact, min_first_fraction=0.5)


def test_mostly_identical():
    want = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1]]
    assert_mostly_identical([[1, 2, 3], [4, 5, 6], [7, 8, 0], [1, 1, 1]], want, max_differing=1)
    with pytest.raises(AssertionError, match="2 of 4"):
        assert_mostly_identical([[1, 2, 3], [4, 5, 0], [7, 8, 0], [1, 1, 1]], want, max_differing=1)
