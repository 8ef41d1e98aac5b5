"""Numerics against transformers: tiny random Llama / Qwen3 checkpoints loaded through our own loader."""
from __future__ import annotations

import pytest
import torch

from braidinfer import LLM, SamplingParams

PROMPT_LENGTHS = [5, 17, 33, 64, 100]


def _prompts(n_lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (n,), generator=g).tolist() for n in n_lengths]


def _hf_greedy(ref, prompt, n):
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                       pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def engine(tiny_model):
    arch, path, ref = tiny_model
    # Small pages and a small token budget so prompts span pages and long ones are prefilled in chunks.
    llm = LLM(model=path, device="cpu", dtype="float32", page_size=4, max_num_batched_tokens=32, progress=False)
    yield llm, ref
    llm.close()


def test_prefill_and_decode_logprobs_match_transformers(engine):
    llm, ref = engine
    prompt = _prompts([40])[0]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True))[0]
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        ref_lp = torch.log_softmax(ref(ids).logits[0].float(), -1)
    for step, lp in enumerate(out.logprobs):
        row = ref_lp[len(prompt) - 1 + step]  # the distribution that produced output token `step`
        assert lp.token_id == out.token_ids[step] == int(row.argmax())
        for token, value in lp.top:
            assert value == pytest.approx(row[token].item(), abs=1e-4)


def test_greedy_continuations_match_alone_and_in_mixed_batches(engine):
    llm, ref = engine
    prompts = _prompts(PROMPT_LENGTHS, seed=1)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    expected = [_hf_greedy(ref, p, 32) for p in prompts]
    alone = [llm.generate(p, params)[0].token_ids for p in prompts]
    batched = [o.token_ids for o in llm.generate(prompts, params)]
    assert alone == expected
    assert batched == expected


def test_same_prompt_twice_in_one_batch(engine):
    llm, ref = engine
    prompt = _prompts([30], seed=2)[0]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = llm.generate([prompt, prompt, prompt[:20]], params)
    assert outs[0].token_ids == outs[1].token_ids == _hf_greedy(ref, prompt, 16)
    assert outs[2].token_ids == _hf_greedy(ref, prompt[:20], 16)


def test_repetition_penalty_matches_transformers_generate(engine):
    llm, ref = engine
    prompt = _prompts([12], seed=4)[0]
    ours = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                               repetition_penalty=1.5))[0].token_ids
    hf = ref.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                      repetition_penalty=1.5, pad_token_id=0, eos_token_id=None)
    assert ours == hf[0, len(prompt):].tolist()
