"""Numeric checks shared by the kernel and GPU tests, written as plain functions over tensors and lists so that
tests/unit/test_numeric_checks.py and tests/kernels/test_decode_attention.py can show each one rejects the bugs it is
meant to catch (outputs computed from a lost split, a wrong page, logprobs several nats off, diverging greedy paths).

Each `assert_*` raises AssertionError with a message that names what differs; nothing here imports the engine.
"""
from __future__ import annotations

import torch

ATTENTION_REL_TOL = 1e-2
"""Largest ||out - ref|| / ||ref|| per (row, query head) for attention outputs rounded once to bf16.

Rounding to bf16 moves each element by at most 2**-9 of itself, so the ratio stays below ~2e-3 whatever the row length;
attention over random KV averages V, whose norm falls as 1/sqrt(tokens), so an absolute tolerance (2e-2) stops seeing
errors at long rows. Measured at Qwen3-0.6B heads (tests/kernels/test_decode_attention.py::test_attention_check_*):
dropping the last 1/16 of a 16k row's KV gives ~0.25, one wrong 16-token page in a 16k row ~0.04."""


def relative_errors(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """||out - ref|| / ||ref|| over the last dimension, in float32: [..., head_dim] -> [...]. A zero reference
    counts any nonzero output as an infinite error."""
    diff = (out.float() - ref.float()).norm(dim=-1)
    norm = ref.float().norm(dim=-1)
    return torch.where(norm > 0, diff / norm.clamp_min(torch.finfo(torch.float32).tiny),
                       torch.where(diff > 0, float("inf"), 0.0))


def assert_attention_close(out: torch.Tensor, ref: torch.Tensor, rel_tol: float = ATTENTION_REL_TOL) -> None:
    """Attention outputs [num_rows, num_qo_heads, head_dim] (any dtype) equal a float32 reference to rounding:
    every (row, head) vector within `rel_tol` of the reference's norm (see ATTENTION_REL_TOL)."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out.float()).all(), "non-finite attention output"
    errors = relative_errors(out, ref)
    worst = int(errors.flatten().argmax()) if errors.numel() else 0
    bad = int((errors > rel_tol).sum())
    assert bad == 0, (f"{bad} of {errors.numel()} (row, head) outputs off by more than {rel_tol:g} of their norm; "
                      f"worst {errors.flatten()[worst].item():.3g} at flat index {worst}")


def max_logprob_gap(want: dict[int, float], got: dict[int, float]) -> float:
    """Largest difference between two top-k logprob lists ({token: logprob}) of one step: |want[t] - got[t]| where
    both list t, and where only one does, at least how far the listed value is above the other list's smallest
    (the unlisted logprob is at most that); inf when either list is empty."""
    if not want or not got:
        return float("inf")
    floor_want, floor_got = min(want.values()), min(got.values())
    gaps = [abs(want[t] - got[t]) if t in got else want[t] - floor_got for t in want]
    gaps += [got[t] - floor_want for t in got.keys() - want.keys()]
    return max(0.0, *gaps)


def common_prefix(a, b) -> int:
    """Length of the identical prefix of two token sequences."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def assert_same_greedy(want_tokens, want_top, got_tokens, got_top, tol: float) -> None:
    """Two greedy continuations of one prompt, each with its top logprobs per step ([{token: logprob}, ...]):
    the same length; at every step whose context is the same (up to and including the first differing token) the
    shared top logprobs within `tol` nats; and where they part, `got`'s token is among `want`'s top tokens within
    `tol` of the chosen one (a near-tie that rounding may flip)."""
    assert len(got_tokens) == len(want_tokens), f"{len(got_tokens)} tokens, want {len(want_tokens)}"
    n = common_prefix(want_tokens, got_tokens)
    for step in range(min(n + 1, len(want_tokens))):
        gap = max_logprob_gap(want_top[step], got_top[step])
        assert gap <= tol, f"step {step}: logprobs differ by {gap:.3f} nats (at most {tol} may)"
    if n < len(want_tokens):
        w, token = want_top[n], got_tokens[n]
        assert token in w and w[want_tokens[n]] - w[token] <= tol, (
            f"step {n}: chose {token} where the reference chose {want_tokens[n]}, not a near-tie: {w}")


def assert_error_like_reference(ours: float, reference: float, abs_tol: float) -> None:
    """Our largest logprob error against the float32 model (nats) is of the size of a reference's bf16 error (at
    most twice it, plus 0.1 for errors near zero) and, however large the reference's error, at most `abs_tol`."""
    assert ours <= 2 * reference + 0.1, f"error {ours:.3f} nats against the reference's {reference:.3f}"
    assert ours <= abs_tol, f"error {ours:.3f} nats, more than the {abs_tol} allowed"


def assert_greedy_agreement(ours, reference, exact, min_first_fraction: float) -> None:
    """Greedy continuations (lists of token lists) of ours and of a reference bf16 model, each compared with the
    float32 model's `exact` ones: ours agree on at least `min_first_fraction` of the first tokens, and their mean
    identical prefix is at least 0.75 of the reference's, less one token."""
    n = len(exact)
    first = sum(o[:1] == e[:1] for o, e in zip(ours, exact))
    ours_mean = sum(map(common_prefix, ours, exact)) / n
    ref_mean = sum(map(common_prefix, reference, exact)) / n
    assert first >= min_first_fraction * n, f"only {first} of {n} first tokens agree"
    assert ours_mean >= 0.75 * ref_mean - 1, f"mean identical prefix {ours_mean:.1f}, reference's {ref_mean:.1f}"


def assert_mostly_identical(got, want, max_differing: int) -> None:
    """At most `max_differing` of the token lists in `got` differ from `want`'s."""
    differing = sum(g != w for g, w in zip(got, want, strict=True))
    assert differing <= max_differing, f"{differing} of {len(want)} continuations differ (at most {max_differing})"
