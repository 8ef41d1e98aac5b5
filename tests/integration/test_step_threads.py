"""CPU decode steps run on EngineConfig.cpu_decode_threads intra-op threads, or on the count ThreadCountChooser
measures fastest (the default); prefill steps on the count the engine's thread had, which every step leaves as it
found it; the tokens do not depend on the thread count."""
from __future__ import annotations

import pytest
import torch

from braidinfer import SamplingParams
from braidinfer.config import EngineConfig
from braidinfer.engine import LLMEngine
from braidinfer.step_threads import StepThreads, ThreadCountChooser, candidates


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir):
    return tiny_model_dir("llama", seed=3)


@pytest.fixture
def three_threads():
    """The test thread's intra-op count set to 3 (above the decode counts the tests set), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)


def _run(llama_dir, monkeypatch, max_tokens=5, **kw):
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
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    seqs = [engine.requests.sequence(list(range(10 + i, 30 + 7 * i)), params) for i in range(2)]
    for seq in seqs:
        engine.add(seq)
    while engine.has_work():
        engine.step()
        assert torch.get_num_threads() == 3  # restored after every step
    return steps, [seq.token_ids for seq in seqs]


def test_decode_steps_use_the_decode_thread_count(llama_dir, monkeypatch, three_threads):
    steps, tokens = _run(llama_dir, monkeypatch, cpu_decode_threads=1)
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
    # the default measures: decode steps follow the chooser's schedule over 1, 2 and 3 threads, the tokens the same
    steps3, tokens3 = _run(llama_dir, monkeypatch, max_tokens=10)
    by_rows: dict[int, list[int]] = {}  # one schedule per rows bucket (both requests decoding, then one)
    for new_tokens, count, logits_count in (step for step in steps3 if all(n == 1 for n in step[0])):
        by_rows.setdefault(len(new_tokens), []).append(count)
        assert logits_count == 3  # the logits on the engine thread's count, whatever the step's
    schedule = [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3]
    assert by_rows and all(counts == schedule[:len(counts)] for counts in by_rows.values())
    assert max(len(counts) for counts in by_rows.values()) >= 4
    assert [t[:len(short)] for t, short in zip(tokens3, tokens)] == tokens


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
    with LLM(llama_dir, device="cpu", dtype="float32", progress=False, cpu_decode_threads=1) as llm:
        assert counts == [1] and torch.get_num_threads() == three_threads
        llm.generate([list(range(5, 25))], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert step_counts[0] == ([20], three_threads)  # the prefill, on the engine thread
    assert [threads for _, threads in step_counts[1:]] == [1, 1]  # decode steps: cpu_decode_threads
    with pytest.raises(RuntimeError, match="boom"), without_workers(torch.device("cpu")) as caller_threads:
        assert torch.get_num_threads() == 1 and caller_threads == three_threads
        raise RuntimeError("boom")
    assert torch.get_num_threads() == three_threads
    with without_workers(torch.device("cuda")) as caller_threads:
        assert torch.get_num_threads() == three_threads == caller_threads


def test_the_candidate_counts_are_one_the_powers_of_two_and_the_engine_threads_count():
    assert [candidates(n) for n in (1, 2, 3, 4, 6, 16)] == [
        (1,), (1, 2), (1, 2, 3), (1, 2, 4), (1, 2, 4, 6), (1, 2, 4, 8, 16)]


def _drive(chooser, key, counts, seconds_of, steps):
    """Runs `steps` steps of `key` through the chooser, step i on count c taking seconds_of(i, c); returns the
    counts used."""
    used = []
    for i in range(steps):
        count = chooser.count(key, counts)
        used.append(count)
        chooser.record(key, count, seconds_of(i, count))
    return used


def test_the_chooser_explores_in_interleaved_blocks_then_keeps_the_fastest_count(monkeypatch):
    monkeypatch.setattr(ThreadCountChooser, "EXPLOIT", 20)
    chooser, key = ThreadCountChooser(), ("rows", 2)
    times = {1: 0.020, 2: 0.015}
    # the first step of each block pays for switching: it is not counted
    used = _drive(chooser, key, (1, 2), lambda i, c: times[c] + i / 1000, 12)
    assert used == [1, 1, 1, 2, 2, 2, 2, 2, 2, 1, 1, 1]  # the second round in reverse order
    assert {c: [round((t - times[c]) * 1000) for t in ts] for c, ts in chooser._keys[key].samples.items()} == {
        1: [1, 2, 10, 11], 2: [4, 5, 7, 8]}
    used = _drive(chooser, key, (1, 2), lambda i, c: times[c], 20)
    assert used == [2] * 20 and chooser.chosen(key) == 2
    # then it explores again: two threads have become slow (another team in the process), so one is kept
    times[2] = 0.030
    used = _drive(chooser, key, (1, 2), lambda i, c: times[c], 12 + 5)
    assert used[:12] == [1, 1, 1, 2, 2, 2, 2, 2, 2, 1, 1, 1] and used[12:] == [1] * 5 and chooser.chosen(key) == 1


def test_later_explorations_try_the_chosen_count_and_its_neighbours_less_and_less_often(monkeypatch):
    monkeypatch.setattr(ThreadCountChooser, "EXPLOIT", 10)
    monkeypatch.setattr(ThreadCountChooser, "MAX_EXPLOIT", 30)
    chooser, key, counts = ThreadCountChooser(), ("rows", 8), (1, 2, 4, 8)
    times = {1: 0.04, 2: 0.02, 4: 0.01, 8: 0.015}
    used = _drive(chooser, key, counts, lambda i, c: times[c], 24 + 10 + 18 + 20 + 18 + 30 + 18 + 30)
    assert used[:24] == [1] * 3 + [2] * 3 + [4] * 3 + [8] * 6 + [4] * 3 + [2] * 3 + [1] * 3  # every count first
    assert used[24:34] == [4] * 10
    assert sorted(set(used[34:52])) == [2, 4, 8]  # then 4 and its neighbours only
    assert used[52:72] == [4] * 20 and used[90:120] == [4] * 30 and used[138:] == [4] * 30  # kept: 2x, then capped
    assert chooser.chosen(key) == 4


def test_the_chooser_keeps_keys_apart_and_never_explores_a_single_count():
    chooser = ThreadCountChooser()
    assert _drive(chooser, ("one", 1), (1,), lambda i, c: 0.01, 5) == [1] * 5
    _drive(chooser, ("a", 2), (1, 2), lambda i, c: 0.01 * c, 12)
    _drive(chooser, ("b", 2), (1, 2), lambda i, c: 0.03 / c, 12)
    assert chooser.chosen(("a", 2)) == 1 and chooser.chosen(("b", 2)) == 2
    # a step recorded on another count than the one asked for (a fixed count in between) is not counted
    chooser.count(("c", 2), (1, 2))
    chooser.record(("c", 2), 2, 5.0)
    assert chooser.count(("c", 2), (1, 2)) == 1


def test_for_step_times_decode_steps_per_rows_bucket(monkeypatch, three_threads):
    """The measuring StepThreads asks its chooser per (rows bucket, starting count), runs the step on the count it
    returns and records the step's wall time; prefill steps and failed steps are not recorded."""
    from types import SimpleNamespace

    clock = iter(range(1000))
    monkeypatch.setattr("braidinfer.step_threads.time", SimpleNamespace(perf_counter=lambda: next(clock)))
    threads = StepThreads(torch.device("cpu"), None)
    seen = []
    monkeypatch.setattr(threads.chooser, "record", lambda key, count, seconds: seen.append((key, count, seconds)))
    for rows in (1, 3, 4, 5):
        with threads.for_step([1] * rows):
            assert torch.get_num_threads() == 1  # the first count of every key's schedule
    with threads.for_step([7]):  # a prefill step: not measured
        assert torch.get_num_threads() == 3
    with pytest.raises(RuntimeError, match="step failed"), threads.for_step([1]):
        raise RuntimeError("step failed")
    assert seen == [((1, 3), 1, 1), ((4, 3), 1, 1), ((4, 3), 1, 1), ((8, 3), 1, 1)]
    assert torch.get_num_threads() == 3
