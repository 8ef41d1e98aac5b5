"""CPU decode steps run on EngineConfig.cpu_decode_threads intra-op threads; prefill steps on the count the engine's
thread had, which every step leaves as it found it; the tokens do not depend on the thread count."""
from __future__ import annotations

import pytest
import torch

from braidinfer import SamplingParams
from braidinfer.config import EngineConfig
from braidinfer.engine import LLMEngine
from braidinfer.step_threads import StepThreads


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir):
    return tiny_model_dir("llama", seed=3)


@pytest.fixture
def three_threads():
    """The test thread's intra-op count set to 3 (not the default of 1 for decode), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)


def _run(llama_dir, monkeypatch, **kw):
    """(each step's (new tokens per row, intra-op threads inside the forward[, and inside compute_logits when the
    step samples]), the requests' tokens)."""
    engine = LLMEngine(EngineConfig(model=llama_dir, device="cpu", dtype="float32", page_size=4, max_model_len=256,
                                    progress=False, max_num_batched_tokens=16, **kw))
    steps = []
    run = engine.runner.run

    def recording(batch, *args, **kwargs):
        steps.append((list(batch.num_new_tokens), torch.get_num_threads()))
        return run(batch, *args, **kwargs)

    monkeypatch.setattr(engine.runner, "run", recording)
    logits = engine.model.compute_logits

    def recording_logits(hidden):
        steps[-1] = steps[-1] + (torch.get_num_threads(),)
        return logits(hidden)

    monkeypatch.setattr(engine.model, "compute_logits", recording_logits)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    seqs = [engine.requests.sequence(list(range(10 + i, 30 + 7 * i)), params) for i in range(2)]
    for seq in seqs:
        engine.add(seq)
    while engine.has_work():
        engine.step()
        assert torch.get_num_threads() == 3  # restored after every step
    return steps, [seq.token_ids for seq in seqs]


def test_decode_steps_use_the_decode_thread_count(llama_dir, monkeypatch, three_threads):
    steps, tokens = _run(llama_dir, monkeypatch)
    decode = [step[1] for step in steps if all(n == 1 for n in step[0])]
    prefill = [step[1] for step in steps if any(n > 1 for n in step[0])]
    assert len(prefill) >= 2 and decode  # chunked prompts, then decodes
    assert set(prefill) == {3} and set(decode) == {1}
    # a decode step's logits (its one large product) run on the engine thread's own count again
    assert {step[2] for step in steps if all(n == 1 for n in step[0])} == {3}
    assert {step[2] for step in steps if len(step) == 3 and any(n > 1 for n in step[0])} <= {3}
    steps2, tokens2 = _run(llama_dir, monkeypatch, cpu_decode_threads=2)
    assert {step[1] for step in steps2 if all(n == 1 for n in step[0])} == {2}
    assert tokens2 == tokens


def test_the_decode_thread_count_is_validated():
    with pytest.raises(ValueError, match="cpu_decode_threads"):
        EngineConfig(cpu_decode_threads=0)


def test_the_count_is_restored_when_a_step_raises_and_untouched_on_cuda(three_threads):
    threads = StepThreads(torch.device("cpu"), 2)
    with pytest.raises(RuntimeError, match="step failed"):
        with threads.for_step([1, 1]):
            assert torch.get_num_threads() == 2
            raise RuntimeError("step failed")
    assert torch.get_num_threads() == 3
    with StepThreads(torch.device("cuda"), 1).for_step([1]):
        assert torch.get_num_threads() == 3


def test_wide_runs_on_the_count_the_decode_step_started_from(three_threads):
    """wide(): the step's starting count inside a decode step, the decode count again after (also when the body
    raises); nothing outside a decode step, in a prefill step, or where the decode count is not below the start."""
    threads = StepThreads(torch.device("cpu"), 1)
    with threads.wide():
        assert torch.get_num_threads() == 3
    with threads.for_step([1, 1]):
        assert torch.get_num_threads() == 1
        with threads.wide():
            assert torch.get_num_threads() == 3
        assert torch.get_num_threads() == 1
        with pytest.raises(RuntimeError, match="logits failed"):
            with threads.wide():
                raise RuntimeError("logits failed")
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 3
    with threads.for_step([4, 1]), threads.wide():  # a prefill step keeps the count throughout
        assert torch.get_num_threads() == 3
    more = StepThreads(torch.device("cpu"), 4)  # a decode count above the start: wide() leaves it
    with more.for_step([1]), more.wide():
        assert torch.get_num_threads() == 4


def test_an_llm_builds_its_cpu_engine_without_giving_its_caller_workers(llama_dir, monkeypatch, three_threads):
    """LLM builds a CPU engine on one intra-op thread of its caller (whose count comes back afterwards), so that the
    caller starts no OpenMP team of its own beside the engine thread's; the engine thread runs prefill steps on the
    caller's count all the same. On CUDA without_workers changes nothing."""
    from braidinfer import LLM
    from braidinfer import llm as llm_module
    from braidinfer.step_threads import without_workers

    counts, step_counts = [], []
    build = llm_module.LLMEngine

    def recording(config):
        counts.append(torch.get_num_threads())
        engine = build(config)
        run = engine.runner.run

        def recording_run(batch, *args, **kwargs):
            step_counts.append((list(batch.num_new_tokens), torch.get_num_threads()))
            return run(batch, *args, **kwargs)

        engine.runner.run = recording_run
        return engine

    monkeypatch.setattr(llm_module, "LLMEngine", recording)
    with LLM(llama_dir, device="cpu", dtype="float32", progress=False) as llm:
        assert counts == [1] and torch.get_num_threads() == three_threads
        llm.generate([list(range(5, 25))], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert step_counts[0] == ([20], three_threads)  # the prefill, on the engine thread
    assert [threads for _, threads in step_counts[1:]] == [1, 1]  # decode steps: cpu_decode_threads' default
    with pytest.raises(RuntimeError, match="boom"), without_workers(torch.device("cpu")) as caller_threads:
        assert torch.get_num_threads() == 1 and caller_threads == three_threads
        raise RuntimeError("boom")
    assert torch.get_num_threads() == three_threads
    with without_workers(torch.device("cuda")) as caller_threads:
        assert torch.get_num_threads() == three_threads == caller_threads
