"""The parity checks every architecture passes against transformers (CPU, float32, tiny random checkpoints).

`assert_logprobs_match` compares top-k logprobs at prefill and at every decode step; `assert_greedy_matches`
compares greedy continuations alone and in one mixed batch. Both take a running LLM and the transformers model the
checkpoint was saved from (the independent reference).
"""
from __future__ import annotations

import pytest
import torch

from braidinfer import SamplingParams


def random_prompts(lengths, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts of the given lengths, avoiding the first few (special) ids."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(ref, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of `prompt`, exactly n tokens (no eos)."""
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def assert_logprobs_match(llm, ref, prompt: list[int], steps: int = 8, top: int = 5, abs_tol: float = 1e-4) -> None:
    """The engine's top-`top` logprobs at each of `steps` greedy steps equal transformers' full-sequence logprobs."""
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=steps, logprobs=top, ignore_eos=True))[0]
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        ref_lp = torch.log_softmax(ref(ids).logits[0].float(), -1)  # (len, vocab)
    assert len(out.logprobs) == steps
    worst = 0.0
    for step, lp in enumerate(out.logprobs):
        row = ref_lp[len(prompt) - 1 + step]  # the distribution that produced output token `step`
        assert lp.token_id == out.token_ids[step] == int(row.argmax()), f"step {step}"
        for token, value in lp.top:
            assert value == pytest.approx(row[token].item(), abs=abs_tol), f"step {step}, token {token}: {value:.6g} vs {row[token].item():.6g}"
            worst = max(worst, abs(value - row[token].item()))
    print(f"max |logprob - transformers'| over {steps} steps of a {len(prompt)}-token prompt: {worst:.2e}")


def assert_greedy_matches(llm, ref, prompts: list[list[int]], steps: int = 32) -> None:
    """Greedy continuations of `steps` tokens equal transformers', each prompt alone and all in one batch."""
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    expected = [hf_greedy(ref, p, steps) for p in prompts]
    alone = [llm.generate(p, params)[0].token_ids for p in prompts]
    batched = [o.token_ids for o in llm.generate(prompts, params)]
    assert alone == expected
    assert batched == expected
