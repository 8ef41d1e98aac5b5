"""Continuous batching decisions, driven without a model: each step 'computes' what was scheduled."""
from __future__ import annotations

from braidinfer.kv.page_manager import PageManager
from braidinfer.scheduler import Scheduler
from braidinfer.sequence import Sequence, SequenceStatus


def _seq(name, n_prompt, max_tokens=8):
    return Sequence(name, list(range(1000 * len(name), 1000 * len(name) + n_prompt)), None, max_tokens)


def _step(sched: Scheduler, next_token=7):
    """One engine step without a model: advance computed counts, append a token where a sequence samples."""
    batch = sched.schedule()
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        seq.num_computed_tokens += n
        sched.commit(seq)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(next_token)
            if seq.num_output_tokens >= seq.max_tokens:
                sched.finish(seq, "length")
    return batch


def test_long_prompt_is_prefilled_in_chunks_beside_decodes():
    sched = Scheduler(PageManager(100, 4), max_num_seqs=8, max_num_batched_tokens=16)
    a, b = _seq("a", 3), _seq("bb", 40)
    sched.add(a)
    _step(sched)  # a's prefill
    sched.add(b)
    batch = _step(sched)
    assert batch.num_new_tokens == [1, 15]  # a decodes; b gets the rest of the budget
    assert [_step(sched).num_new_tokens for _ in range(2)] == [[1, 15], [1, 10]]
    assert b.num_output_tokens == 1


def test_max_num_seqs_limits_admission():
    sched = Scheduler(PageManager(100, 4), max_num_seqs=2, max_num_batched_tokens=64)
    seqs = [_seq(c, 4) for c in ("a", "bb", "ccc")]
    for s in seqs:
        sched.add(s)
    batch = _step(sched)
    assert batch.seqs == seqs[:2] and seqs[2].status is SequenceStatus.WAITING


def test_preemption_takes_the_newest_and_it_resumes_from_cache():
    pm = PageManager(6, 4)
    sched = Scheduler(pm, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = _seq("a", 8, max_tokens=12), _seq("bb", 8, max_tokens=12)
    sched.add(a)
    sched.add(b)
    while b.status is not SequenceStatus.WAITING or sched.num_preemptions == 0:
        _step(sched)
    assert a.status is SequenceStatus.RUNNING and sched.waiting[0] is b and b.page_table == []
    while sched.has_work():
        _step(sched)
    assert a.num_output_tokens == b.num_output_tokens == 12
    assert pm.num_free + pm.num_cached == pm.num_pages
