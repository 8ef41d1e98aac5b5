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
    """(each step's (new tokens per row, intra-op threads inside the forward), the requests' tokens)."""
    engine = LLMEngine(EngineConfig(model=llama_dir, device="cpu", dtype="float32", page_size=4, max_model_len=256,
                                    progress=False, max_num_batched_tokens=16, **kw))
    steps = []
    run = engine.runner.run

    def recording(batch, *args, **kwargs):
        steps.append((list(batch.num_new_tokens), torch.get_num_threads()))
        return run(batch, *args, **kwargs)

    monkeypatch.setattr(engine.runner, "run", recording)
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
    decode = [threads for rows, threads in steps if all(n == 1 for n in rows)]
    prefill = [threads for rows, threads in steps if any(n > 1 for n in rows)]
    assert len(prefill) >= 2 and decode  # chunked prompts, then decodes
    assert set(prefill) == {3} and set(decode) == {1}
    steps2, tokens2 = _run(llama_dir, monkeypatch, cpu_decode_threads=2)
    assert {threads for rows, threads in steps2 if all(n == 1 for n in rows)} == {2}
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
