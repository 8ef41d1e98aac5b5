"""Continuous batching decisions, driven without a model: each step 'computes' what was scheduled."""
from __future__ import annotations

import pytest

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


def _two_on_a_tight_pool():
    """(pages, scheduler, a, b): two 8-token prompts of 12 output tokens each, added to a pool of 6 pages of 4."""
    pm = PageManager(6, 4)
    sched = Scheduler(pm, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = _seq("a", 8, max_tokens=12), _seq("bb", 8, max_tokens=12)
    sched.add(a)
    sched.add(b)
    return pm, sched, a, b


def test_preemption_takes_the_newest_and_it_resumes_from_cache():
    pm, sched, a, b = _two_on_a_tight_pool()
    while b.status is not SequenceStatus.WAITING or sched.num_preemptions == 0:
        _step(sched)
    assert a.status is SequenceStatus.RUNNING and sched.waiting[0] is b and b.page_table == []
    while sched.has_work():
        _step(sched)
    assert a.num_output_tokens == b.num_output_tokens == 12
    assert pm.num_free + pm.num_cached == pm.num_pages


def test_a_composed_prompt_holding_a_released_chunks_pages_is_not_starved():
    """A composed prompt holds its chunks' pages from its first admission to its end; once the chunk is released
    only it can free them. Preempted, it must not wait behind a sequence that needs those pages: nothing would run."""
    pm = PageManager(12, 8)
    sched = Scheduler(pm, max_num_seqs=2, max_num_batched_tokens=256)
    whole = _seq("h", 16, max_tokens=80)  # 96 tokens: the whole pool
    sched.add(whole)
    _step(sched)
    composed = _seq("ww", 4, max_tokens=40)
    composed.composed_pages = [pm.allocate(4)]  # the released chunk's pages, referenced by `composed` alone
    sched.add(composed)
    for _ in range(500):
        if not sched.has_work():
            break
        _step(sched)
    assert sched.num_preemptions >= 2  # both were preempted at least once
    assert whole.num_output_tokens == 80 and composed.num_output_tokens == 40
    assert pm.num_free + pm.num_cached == pm.num_pages


def test_preempted_sequences_wait_behind_preempted_composed_prompts():
    sched = Scheduler(PageManager(100, 4), max_num_seqs=4, max_num_batched_tokens=64)
    composed, plain, late = _seq("a", 4), _seq("bb", 4), _seq("ccc", 4)
    sched.add(composed)
    sched.add(plain)
    _step(sched)
    composed.composed_pages = [[]]  # as the engine sets it at the first admission
    sched.add(late)
    sched.preempt(composed)
    sched.preempt(plain)
    assert list(sched.waiting) == [composed, plain, late]


def test_a_preempted_sequence_is_counted_in_the_hit_rate_once():
    pm, sched, _, _ = _two_on_a_tight_pool()
    while sched.has_work():
        _step(sched)
    assert sched.num_preemptions > 0
    assert pm.num_lookup_tokens == 7 + 7  # each request's prompt but its last token, looked up at its admission
    assert pm.num_cached_tokens_served == 0  # two unrelated prompts: nothing of either was in the cache before


def test_a_composed_prompt_that_cannot_fit_beside_its_released_chunks_pages_is_rejected():
    """Its released chunk's pages are neither pinned nor usable (it holds them to its end): counted as usable, the
    request was admitted, ran until it preempted itself and then could never come back."""
    pm = PageManager(40, 4)
    pm.adopt_as_pins(pm.allocate(10))  # another chunk, pinned
    seq = _seq("w", 48, max_tokens=70)  # needs 30 pages: 40 - 10 pinned would do
    seq.composed_pages = [pm.allocate(10)]  # a chunk it composes, released since: 20 pages are left to it
    sched = Scheduler(pm, max_num_seqs=4, max_num_batched_tokens=64)
    sched.add(seq)
    assert _step(sched).seqs == []
    [(rejected, reason)] = sched.take_rejected()
    assert rejected is seq and "needs up to 30 KV pages" in reason and "only 20 of the pool's 40" in reason


def _run_out(sched: Scheduler) -> None:
    """Steps until nothing is left, failing rejected sequences as the engine does."""
    for _ in range(200):
        if not sched.has_work():
            return
        _step(sched)
        for seq, _ in sched.take_rejected():
            sched.finish(seq, "error")
    raise AssertionError("the scheduler never finished")


def test_with_nothing_running_a_composed_prompt_holding_pages_goes_ahead_of_one_that_needs_them():
    """Two composed prompts holding released chunks' pages: the first fits the pool, but not beside the second's
    held pages, and nothing runs that could give pages back. The second fits beside the first's: it goes first, and
    its end gives the first its pages (rejecting the first, or keeping it first in line for ever, were both wrong)."""
    pm = PageManager(12, 4)
    first, second = _seq("a", 24, max_tokens=4), _seq("bb", 4, max_tokens=4)
    first.composed_pages, second.composed_pages = [pm.allocate(2)], [pm.allocate(6)]
    sched = Scheduler(pm, max_num_seqs=4, max_num_batched_tokens=64)
    sched.add(first)
    sched.add(second)
    assert _step(sched).seqs == [second]
    assert sched.take_rejected() == []
    _run_out(sched)
    assert first.finish_reason == second.finish_reason == "length"
    assert first.num_output_tokens == second.num_output_tokens == 4
    assert pm.num_free + pm.num_cached == pm.num_pages


@pytest.mark.parametrize("budget", [64, 16], ids=["whole prompts", "chunked prefill"])
def test_with_nothing_running_one_of_two_composed_prompts_that_block_each_other_is_rejected(budget):
    """Each fits the pool but not beside the other's held pages: one is rejected, and once its end gives its pages
    back the other runs. Rejected in the same step, both failed; admitted for a first chunk that fits, the first
    preempted itself for ever when it needed the rest (composed prompts are private: nothing cached to go on from)."""
    pm = PageManager(12, 4)
    first, second = _seq("a", 28, max_tokens=4), _seq("bb", 28, max_tokens=4)
    first.private = second.private = True
    first.composed_pages, second.composed_pages = [pm.allocate(4)], [pm.allocate(4)]
    sched = Scheduler(pm, max_num_seqs=4, max_num_batched_tokens=budget)
    sched.add(first)
    sched.add(second)
    assert _step(sched).seqs == []
    [(rejected, reason)] = sched.take_rejected()
    assert "needs up to 8 more KV pages but only 4 of the pool's 12" in reason
    sched.finish(rejected, "error")
    _run_out(sched)
    other = first if rejected is second else second
    assert other.finish_reason == "length" and other.num_output_tokens == 4
    assert sched.num_preemptions == 0
    assert pm.num_free + pm.num_cached == pm.num_pages


def test_of_composed_prompts_that_block_each_other_the_one_holding_most_pages_is_rejected():
    """Three hold 2, 4 and 2 pages and need 7, 7 and 8 of the pool's 12: none fits beside the others' held pages.
    Failing the one with 4 lets the first go (7 <= 12 - 2 - 2), then the third; failing the last one tried (the
    third, 2 pages) left the first short too, and it was failed as well."""
    pm = PageManager(12, 4)
    seqs = _seq("a", 24, max_tokens=5), _seq("bb", 24, max_tokens=5), _seq("ccc", 28, max_tokens=5)
    sched = Scheduler(pm, max_num_seqs=4, max_num_batched_tokens=64)
    for seq, held in zip(seqs, (2, 4, 2)):
        seq.private = True
        seq.composed_pages = [pm.allocate(held)]
        sched.add(seq)
    _run_out(sched)
    assert [seq.finish_reason for seq in seqs] == ["length", "error", "length"]
    assert pm.num_free + pm.num_cached == pm.num_pages


def test_a_composed_prompt_that_never_fits_is_rejected_alone_in_its_step():
    """The second never fits beside the pins and its own held pages and is rejected; the first, waiting on the
    second's held pages, goes on once they are given back (it was rejected in the same step, before they were)."""
    pm = PageManager(12, 4)
    pm.adopt_as_pins(pm.allocate(2))
    first, second = _seq("a", 20, max_tokens=1), _seq("bb", 28, max_tokens=1)
    first.private = second.private = True
    first.composed_pages, second.composed_pages = [pm.allocate(3)], [pm.allocate(4)]
    sched = Scheduler(pm, max_num_seqs=4, max_num_batched_tokens=64)
    sched.add(first)
    sched.add(second)
    assert _step(sched).seqs == []
    [(rejected, reason)] = sched.take_rejected()
    assert rejected is second and "needs up to 7 KV pages" in reason
    sched.finish(second, "error")
    _run_out(sched)
    assert first.finish_reason == "length" and first.num_output_tokens == 1


def test_a_pin_is_weighed_against_a_preempted_requests_pinned_prefix():
    """A preempted request holds no pages, but the pinned pages its prompt starts with are still its own to use:
    a pin that leaves it room is not refused, one that does not is (counting them as none, the first was refused
    and the second was not)."""
    pm = PageManager(10, 4)
    sched = Scheduler(pm, max_num_seqs=4, max_num_batched_tokens=64)
    chunk = _seq("c", 8, max_tokens=2)
    sched.add(chunk)
    _step(sched)
    pinned = chunk.page_table[:2]
    pm.pin(pinned)  # as the engine pins a chunk once its prefill is done
    sched.finish(chunk, "stop")
    seq = Sequence("s", chunk.token_ids[:8] + list(range(50, 54)), None, 25)  # KV of 36 tokens: 9 pages
    sched.add(seq)
    _step(sched)
    assert seq.page_table[:2] == pinned
    sched.preempt(seq)
    assert seq.page_table == [] and seq.num_cached_prompt_tokens == 8
    other = pm.allocate(2)  # another chunk's prefill, about to be pinned
    assert sched.starved_by_pin(other[:1]) is None  # 10 - 3 pinned + 2 of its own = 9 pages: enough
    assert "request s needs up to 9 of the pool's 10 and would be left 8" in sched.starved_by_pin(other)
