"""A burst whose KV exceeds the page pool, streamed: every request finishes through preemption and resume with
exactly the tokens it gets in a roomy pool (seeded sampling included: a resumed request recomputes its KV, it
does not sample again), streams neither repeat nor drop text, a request that can never fit is named at once, and
cancelling requests while they are preempted leaks nothing. (test_engine_api covers the batch `generate` path.)"""
from __future__ import annotations

import asyncio

import pytest
import torch

from braidinfer import SamplingParams
from braidinfer.errors import InvalidRequestError
from tests.support.engines import idle_problems, tiny_engine

NUM_PAGES = 30  # x 4 tokens: about 2.5 of these requests at full length, 10 arriving at once


def _prompts(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (20 + i,), generator=g).tolist() for i in range(n)]


def _params(n):
    """Greedy and seeded sampling, alternating."""
    return [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True) if i % 2 else
            SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i, max_tokens=24, ignore_eos=True)
            for i in range(n)]


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """(prompts, params, their (token ids, text)) in a roomy pool, one step at a time: what either mode must give."""
    prompts, params = _prompts(10, seed=21), _params(10)
    with tiny_engine(tiny_llama) as roomy:
        return prompts, params, [(o.token_ids, o.text) for o in roomy.generate(prompts, params)]


async def _stream(llm, prompt, params, stop_after=None):
    """(token ids, text) of a streamed request; stops reading after `stop_after` chunks when given."""
    ids, text, count = [], [], 0
    async for chunk in llm.astream_deltas(prompt, params):
        ids += chunk.token_ids
        text.append(chunk.text)
        count += 1
        if stop_after is not None and count == stop_after:
            break
    return ids, "".join(text)


def test_streamed_burst_over_the_pool_loses_nothing(tiny_llama, async_scheduling, reference):
    prompts, params, expected = reference
    with tiny_engine(tiny_llama, num_kv_pages=NUM_PAGES, async_scheduling=async_scheduling) as tight:
        async def main():
            never_fits = tight.astream_deltas(list(range(3, 200)), SamplingParams(max_tokens=16))
            with pytest.raises(InvalidRequestError, match="page pool holds 120"):
                await anext(never_fits)
            return await asyncio.wait_for(asyncio.gather(*(_stream(tight, p, sp) for p, sp in zip(prompts, params))),
                                          120)

        assert asyncio.run(main()) == expected
        assert tight.engine.scheduler.num_preemptions > 0
        assert not idle_problems(tight)


def test_cancelling_preempted_requests_leaks_nothing(tiny_llama, async_scheduling, reference):
    """Half the burst is cancelled the moment the scheduler preempts it (the abort reaches the engine while the
    request waits to resume, holding no pages but its output so far)."""
    prompts, params, expected = reference
    with tiny_engine(tiny_llama, num_kv_pages=NUM_PAGES, async_scheduling=async_scheduling) as tight:
        scheduler, cancelled = tight.engine.scheduler, []
        preempt = scheduler.preempt

        def preempt_then_cancel(seq):
            preempt(seq)
            if prompts.index(seq.token_ids[: seq.num_prompt_tokens]) % 2 and seq.request_id not in cancelled:
                cancelled.append(seq.request_id)
                tight._loop.post(lambda: tight.engine.abort(seq.request_id))  # what a caller's cancel posts

        scheduler.preempt = preempt_then_cancel

        async def main():
            return await asyncio.wait_for(asyncio.gather(*(_stream(tight, p, sp) for p, sp in zip(prompts, params))),
                                          120)

        results = asyncio.run(main())
        assert cancelled, "no request to cancel was preempted"
        for i, ((ids, text), (expected_ids, expected_text)) in enumerate(zip(results, expected)):
            if i % 2 == 0:
                assert (ids, text) == (expected_ids, expected_text)
            else:  # cancelled or finished: what it streamed is the start of its answer
                assert ids == expected_ids[: len(ids)] and expected_text.startswith(text)
        assert not idle_problems(tight)


def test_a_request_whose_kv_fills_the_pool_exactly_runs(tiny_llama, async_scheduling):
    """The last output token is sampled, never fed back: a request writes the KV of its prompt and max_tokens - 1
    outputs. 12 + 9 tokens on a pool of 5 pages of 4 runs to its end (counting 21, it was refused as never fitting)
    and gives the tokens it gets in a roomy pool; one token more is refused."""
    prompt = _prompts(1, seed=5)[0][:12]
    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    with tiny_engine(tiny_llama) as roomy:
        [expected] = roomy.generate([prompt], params)
    with tiny_engine(tiny_llama, num_kv_pages=5, async_scheduling=async_scheduling) as exact:
        [out] = exact.generate([prompt], params)
        assert out.token_ids == expected.token_ids and len(out.token_ids) == 9
        with pytest.raises(InvalidRequestError, match="needs up to 21 tokens of KV cache"):
            exact.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
        assert not idle_problems(exact)
