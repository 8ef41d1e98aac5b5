"""Asynchronous scheduling (each step queued before the previous step's tokens are appended) gives exactly the
outputs of one-step-at-a-time scheduling: greedy and seeded sampling, stop tokens and strings, length limits,
preemption, aborts, and requests that must go one step at a time (penalties, grammar, logprobs) in the same batch.
On the CPU nothing overlaps, but the bookkeeping (pending tokens, input tokens read on the device, dropped extra
tokens) is the same as on CUDA, where it is the default."""
from __future__ import annotations

import pytest
import torch

from braidinfer import LLM, SamplingParams
from braidinfer.config import EngineConfig
from braidinfer.engine import LLMEngine


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir):
    return tiny_model_dir("llama", seed=3)


def _engine_kwargs(llama_dir, **kw):
    return dict(model=llama_dir, device="cpu", dtype="float32", page_size=4, max_model_len=256, progress=False, **kw)


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (5 + 3 * i,), generator=g).tolist() for i in range(n)]


def _run_both(llama_dir, prompts, params, **kw):
    """(outputs one step at a time, outputs with asynchronous scheduling, the asynchronous LLM's cache stats)."""
    results = []
    for async_scheduling in (False, True):
        with LLM(**_engine_kwargs(llama_dir, async_scheduling=async_scheduling, **kw)) as llm:
            outs = llm.generate(prompts, params)
            results.append([(o.token_ids, o.text, o.finish_reason, o.usage) for o in outs])
            stats = llm.cache_stats()
    return results[0], results[1], stats


def test_same_outputs_greedy_and_seeded_with_length_and_stop_tokens(llama_dir):
    prompts = _prompts(8)
    with LLM(**_engine_kwargs(llama_dir, async_scheduling=False)) as llm:
        free = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    # Stop tokens that each greedy output really meets mid-way (so some requests stop early, others run to length).
    stops = sorted({o.token_ids[5] for o in free[:4]})
    params = [SamplingParams(temperature=0, max_tokens=3 + i, stop_token_ids=stops) if i % 2 else
              SamplingParams(temperature=0.8, top_p=0.9, seed=100 + i, max_tokens=12, stop_token_ids=stops)
              for i in range(len(prompts))]
    sync, overlapped, stats = _run_both(llama_dir, prompts, params)
    assert overlapped == sync
    assert {r[2] for r in sync} == {"stop", "length"}  # both ways of ending were exercised
    assert stats["in_use"] == 0


def test_same_outputs_with_stop_strings(llama_dir):
    prompts = _prompts(4, seed=1)
    with LLM(**_engine_kwargs(llama_dir, async_scheduling=False)) as llm:
        texts = [o.text for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))]
    stop = [t[len(t) // 2 : len(t) // 2 + 3] for t in texts if len(t) > 8][:2]
    sync, overlapped, _ = _run_both(llama_dir, prompts,
                                    SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=stop))
    assert overlapped == sync
    assert any(r[2] == "stop" for r in sync)


def test_requests_that_need_their_last_token_mix_with_overlapped_ones(llama_dir):
    prompts = _prompts(6, seed=2)
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, repetition_penalty=1.5),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.7, seed=5, max_tokens=10, ignore_eos=True, frequency_penalty=0.5),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, presence_penalty=1.0)]
    sync, overlapped, _ = _run_both(llama_dir, prompts, params)
    assert overlapped == sync


def test_same_outputs_under_preemption(llama_dir):
    prompts = _prompts(6, seed=3)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs = []
    for async_scheduling in (False, True):
        with LLM(**_engine_kwargs(llama_dir, async_scheduling=async_scheduling, num_kv_pages=24)) as llm:
            scheduler, in_flight_victims = llm.engine.scheduler, []
            preempt = scheduler.preempt

            def preempt_and_record(seq, preempt=preempt, record=in_flight_victims):
                record.append(seq.num_pending_tokens)
                preempt(seq)

            scheduler.preempt = preempt_and_record
            outputs.append([o.token_ids for o in llm.generate(prompts, params)])
            assert llm.cache_stats()["in_use"] == 0
        assert in_flight_victims  # the pool is too small for all six at once
        if async_scheduling:  # requests were preempted with a token on its way, which they kept
            assert any(in_flight_victims)
    assert outputs[1] == outputs[0]


def test_a_step_stays_in_flight_and_its_token_feeds_the_next_step_on_the_device(llama_dir):
    engine = LLMEngine(EngineConfig(**_engine_kwargs(llama_dir, async_scheduling=True)))
    reference = LLMEngine(EngineConfig(**_engine_kwargs(llama_dir, async_scheduling=False)))
    prompt = _prompts(1, seed=4)[0]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    seqs = []
    for e in (engine, reference):
        seqs.append(e.requests.sequence(prompt, params))
        e.add(seqs[-1])
    seq, ref = seqs
    engine.step()  # prefill + first token, left in flight
    assert seq.num_pending_tokens == 1 and seq.num_output_tokens == 0 and engine.has_work()
    engine.step()  # the second token's step reads the first on the device; then the first is appended
    assert seq.num_pending_tokens == 1 and seq.num_output_tokens == 1
    while engine.has_work():
        engine.step()
    while reference.has_work():
        reference.step()
    assert seq.token_ids == ref.token_ids and seq.num_output_tokens == 6 and seq.num_pending_tokens == 0
    assert engine.pages.stats()["in_use"] == 0


def test_abort_while_a_token_is_in_flight_frees_the_request(llama_dir):
    engine = LLMEngine(EngineConfig(**_engine_kwargs(llama_dir, async_scheduling=True)))
    reference = LLMEngine(EngineConfig(**_engine_kwargs(llama_dir, async_scheduling=False)))
    prompts = _prompts(2, seed=5)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    aborted, kept = (engine.requests.sequence(p, params) for p in prompts)
    ref = reference.requests.sequence(prompts[1], params)
    engine.add(aborted)
    engine.add(kept)
    reference.add(ref)
    for _ in range(3):
        engine.step()
    assert aborted.num_pending_tokens == 1 and aborted.page_table
    engine.abort(aborted.request_id)
    while engine.has_work():
        engine.step()
    while reference.has_work():
        reference.step()
    assert aborted.finish_reason == "abort" and aborted.num_output_tokens == 2
    assert kept.token_ids == ref.token_ids
    stats = engine.pages.stats()
    assert stats["in_use"] == 0 and stats["free"] + stats["cached"] == stats["num_pages"]


def test_a_failing_step_whose_requests_ended_meanwhile_fails_nobody_else(llama_dir):
    """A's second token is a stop token; the step after it (already launched when that token is appended) fails.
    Only A was in that step, and A ended normally: B, still waiting, must not be failed for it."""
    prompts = _prompts(2, seed=6)
    with LLM(**_engine_kwargs(llama_dir, async_scheduling=False)) as llm:
        free = [o.token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8,
                                                                            ignore_eos=True))]
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop_token_ids=[free[0][1]]),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)]
    with LLM(**_engine_kwargs(llama_dir, async_scheduling=True, max_num_seqs=1)) as llm:
        run, calls = llm.engine.runner.run, []

        def fail_third(batch, *pending):
            calls.append([seq.num_prompt_tokens for seq in batch.seqs])
            if len(calls) == 3:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return run(batch, *pending)

        llm.engine.runner.run = fail_third
        a, b = llm.generate(prompts, params)
    assert calls[2] == [len(prompts[0])]  # the failing step ran A alone
    assert a.finish_reason == "stop" and a.token_ids == free[0][:2]
    assert b.finish_reason == "length" and b.token_ids == free[1]
