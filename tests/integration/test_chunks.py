"""Chunk handles: pinned prompt segments are exact, survive memory pressure, and never leak pages."""
from __future__ import annotations

import asyncio

import pytest
import torch

from braidinfer import LLM, SamplingParams
from braidinfer.config import EngineConfig
from braidinfer.engine import LLMEngine
from braidinfer.errors import (
    EngineDeadError,
    InvalidRequestError,
    OutOfPagesError,
    PinWouldStarveError,
    RequestFailedError,
)
from tests.support.engines import idle_problems

PS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def _idle(llm: LLM, pinned: int = 0) -> bool:
    return not idle_problems(llm, pinned=pinned)


def _random_ids(seed: int, n: int) -> list[int]:
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def tiny_llms(tiny_model, async_scheduling):
    """(an LLM with chunks, scheduling as `async_scheduling` says; the reference without a prefix cache)."""
    _, path, _ = tiny_model
    kw = dict(device="cpu", dtype="float32", page_size=PS, num_kv_pages=64, progress=False)
    on = LLM(model=path, async_scheduling=async_scheduling, **kw)
    off = LLM(model=path, enable_prefix_caching=False, **kw)
    yield on, off
    on.close()
    off.close()


def test_chained_chunks_give_the_same_tokens_as_the_uncached_prompt(tiny_llms):
    on, off = tiny_llms
    system = on.chunks.add(_random_ids(1, 37), kind="system")
    doc = on.chunks.add(_random_ids(2, 29), after=system)
    assert system.num_prefix_tokens == 37 and doc.num_prefix_tokens == 66
    assert len(system.pages) == 37 // PS and len(doc.pages) == 66 // PS
    assert doc.pages[: len(system.pages)] == system.pages  # the child pins the shared pages too
    questions = [_random_ids(10 + i, n) for i, n in enumerate((3, 9, 17))]
    with_chunks = on.generate(questions, GREEDY, chunks=[system, doc])
    plain = off.generate([doc.prefix_token_ids + q for q in questions], GREEDY)
    assert [o.token_ids for o in with_chunks] == [o.token_ids for o in plain]
    assert [o.usage.cached_prompt_tokens for o in with_chunks] == [66 // PS * PS] * 3
    assert on.generate(questions[0], GREEDY, chunks=doc)[0].token_ids == plain[0].token_ids  # last chunk alone
    doc.release()
    system.release()
    assert _idle(on)


def test_pinned_chunk_survives_a_flood_that_evicts_everything_else(tiny_llms):
    on, _ = tiny_llms
    system = on.chunks.add(_random_ids(3, 40), kind="system")
    assert on.cache_stats()["pinned"] == 5
    # Each flood request needs 8 of the 64 pages; 16 distinct ones cycle the whole unpinned pool through the cache.
    flood = [_random_ids(100 + i, 50) for i in range(16)]
    on.generate(flood, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    again = on.generate(_random_ids(4, 5), GREEDY, chunks=system)[0]
    assert again.usage.cached_prompt_tokens == 40
    stale = on.generate(flood[0], SamplingParams(temperature=0, max_tokens=1))[0]
    assert stale.usage.cached_prompt_tokens < 48  # unpinned prefixes were evicted meanwhile
    system.release()
    assert _idle(on)


def test_pins_are_refused_beyond_the_pool_share_and_requests_that_cannot_fit_get_a_clear_error(
        tiny_model, async_scheduling):
    _, path, _ = tiny_model
    with LLM(model=path, device="cpu", dtype="float32", page_size=PS, num_kv_pages=16, max_pinned_fraction=0.5,
             async_scheduling=async_scheduling, progress=False) as llm:
        with pytest.raises(InvalidRequestError, match="at most 8 of the pool's 16"):
            llm.chunks.add(_random_ids(5, 9 * PS))
        a = llm.chunks.add(_random_ids(6, 5 * PS))
        with pytest.raises(OutOfPagesError, match="already pin 5"):
            llm.chunks.add(_random_ids(7, 4 * PS))  # 5 + 4 > 8: refused after its prefill, nothing kept
        assert _idle(llm, pinned=5) and len(llm.chunks) == 1
        big = SamplingParams(temperature=0, max_tokens=8 * PS, ignore_eos=True)
        with pytest.raises(OutOfPagesError, match="not pinned by chunks"):
            llm.generate(_random_ids(8, 4 * PS), big)  # 12 pages, only 11 unpinned
        a.release()
        assert llm.generate(_random_ids(8, 4 * PS), big)[0].usage.completion_tokens == 8 * PS
        assert _idle(llm)


def test_a_pin_that_would_leave_a_running_request_without_room_is_refused_for_now(tiny_model, async_scheduling):
    """A request admitted next to the pins it saw keeps its room: a later pin that would take it is refused with
    PinWouldStarveError (before, the pin was taken and the request failed midway, its output begun, once it came
    back from a preemption); once the request has ended the same pin is taken."""
    _, path, _ = tiny_model
    with LLM(model=path, device="cpu", dtype="float32", page_size=PS, num_kv_pages=16, max_pinned_fraction=0.5,
             async_scheduling=async_scheduling, progress=False) as llm:
        whole = SamplingParams(temperature=0, max_tokens=14 * PS, ignore_eos=True)  # KV of 16 pages: the pool
        tokens, refused = [], None
        for delta in llm.stream_deltas(_random_ids(10, 2 * PS), whole):
            tokens += delta.token_ids
            if refused is None:
                with pytest.raises(PinWouldStarveError, match=r"request \S+ needs up to 16 of the pool's 16") as e:
                    llm.chunks.add(_random_ids(11, 4 * PS))
                refused = e
        assert len(tokens) == 14 * PS and delta.finish_reason == "length"
        assert len(llm.chunks) == 0 and _idle(llm)
        assert llm.chunks.add(_random_ids(11, 4 * PS))
        assert _idle(llm, pinned=4)


def test_a_chunk_and_a_request_computing_its_prefix_in_one_step_share_the_pages(tiny_model):
    """Admitted in the same step, a chunk's prefill and a request that starts with the chunk's tokens both compute
    them, each in its own pages; committing, the later one switches to the earlier one's. The pin was weighed
    before the request's commit: the request, whose KV takes the whole pool, was counted as owning none of the pinned
    pages, and the pin was refused with PinWouldStarveError."""
    _, path, _ = tiny_model
    engine = LLMEngine(EngineConfig(model=path, device="cpu", dtype="float32", page_size=PS, num_kv_pages=16,
                                    max_pinned_fraction=0.5, progress=False))
    prefix = _random_ids(12, 4 * PS)
    chunk = engine.requests.prefill(prefix, "chunk")
    whole = SamplingParams(temperature=0, max_tokens=11 * PS + 1, ignore_eos=True)  # KV of 16 pages: the pool
    seq = engine.requests.sequence(prefix + _random_ids(13, PS), whole)
    engine.add(chunk)
    engine.add(seq)
    engine.step()
    assert chunk.finish_reason == "stop" and len(chunk.pinned_pages) == 4
    assert seq.page_table[:4] == chunk.pinned_pages
    while engine.has_work():
        engine.step()
    assert seq.finish_reason == "length" and seq.num_output_tokens == 11 * PS + 1
    engine.unpin("chunk")
    assert engine.pages.stats()["in_use"] == 0
    engine.close()


def test_a_full_pin_budget_is_named_before_a_running_requests_room(tiny_model, async_scheduling):
    """A pin both over the budget and taking a started request's room is refused as over the budget (OutOfPagesError,
    not PinWouldStarveError): releasing chunks is what makes room, and ChatBraid releases its oldest pins on it."""
    _, path, _ = tiny_model
    with LLM(model=path, device="cpu", dtype="float32", page_size=PS, num_kv_pages=16, max_pinned_fraction=0.5,
             async_scheduling=async_scheduling, progress=False) as llm:
        a = llm.chunks.add(_random_ids(6, 5 * PS))
        tight = SamplingParams(temperature=0, max_tokens=8 * PS, ignore_eos=True)  # KV of 10 pages; 11 are unpinned
        refused = None
        for delta in llm.stream_deltas(_random_ids(10, 2 * PS), tight):
            if refused is None:
                with pytest.raises(OutOfPagesError, match="already pin 5") as e:
                    llm.chunks.add(_random_ids(11, 4 * PS))  # 9 > 8 pinned, and it would leave the request 7
                refused = e
                assert not isinstance(refused.value, PinWouldStarveError)
        assert delta.finish_reason == "length" and len(llm.chunks) == 1
        a.release()
        assert _idle(llm)


def test_request_sharing_pinned_pages_may_use_them(tiny_model, async_scheduling):
    _, path, _ = tiny_model
    with LLM(model=path, device="cpu", dtype="float32", page_size=PS, num_kv_pages=16, max_pinned_fraction=0.5,
             async_scheduling=async_scheduling, progress=False) as llm:
        a = llm.chunks.add(_random_ids(6, 5 * PS))
        big = SamplingParams(temperature=0, max_tokens=6 * PS, ignore_eos=True)
        out = llm.generate(_random_ids(9, 4 * PS), big, chunks=a)[0]  # 5 shared + 10 own pages <= 11 unpinned + 5
        assert out.usage.completion_tokens == 6 * PS
        a.release()
        assert _idle(llm)


def test_invalid_chunk_use_is_rejected_before_any_work(tiny_llms):
    on, off = tiny_llms
    a = on.chunks.add(_random_ids(20, 20))
    b = on.chunks.add(_random_ids(21, 12), after=a)
    c = on.chunks.add(_random_ids(22, 12))
    d = on.chunks.add(_random_ids(23, 4), after=b)
    with pytest.raises(InvalidRequestError, match="chain"):
        on.generate([1, 2], GREEDY, chunks=[c, b])
    with pytest.raises(InvalidRequestError, match="start of the prompt"):
        on.generate([1, 2], GREEDY, chunks=[b, d])  # b alone, or [a, b, d], would be fine
    with pytest.raises(InvalidRequestError, match="another LLM"):
        off.generate([1, 2], GREEDY, chunks=a)
    with pytest.raises(InvalidRequestError, match="kind"):
        on.chunks.add([1, 2, 3], kind="paragraph")
    with pytest.raises(InvalidRequestError, match="empty"):
        on.chunks.add([])
    with pytest.raises(InvalidRequestError, match="prefix cache"):
        off.chunks.add([1, 2, 3])
    c.release()
    c.release()  # idempotent
    with pytest.raises(InvalidRequestError, match="released"):
        on.generate([1, 2], GREEDY, chunks=c)
    for chunk in (d, b, a):
        chunk.release()
    assert _idle(on) and len(on.chunks) == 0


def test_a_prompt_neither_text_nor_ids_is_named_with_chunks(tiny_llms):
    on, _ = tiny_llms
    chained, independent = on.chunks.add(_random_ids(24, 12)), on.chunks.add(_random_ids(25, 12), independent=True)
    for chunk in (chained, independent):
        for bad in (None, 2.5):
            with pytest.raises(InvalidRequestError, match=f"a prompt is a string or a list of token ids, got "
                                                          f"{type(bad).__name__}"):
                on.generate([bad], GREEDY, chunks=chunk)
        with pytest.raises(InvalidRequestError, match="got int"):
            list(on.stream(5, GREEDY, chunks=chunk))
    chained.release()
    independent.release()
    assert _idle(on)


def test_cancelled_async_add_leaves_nothing_pinned(tiny_llms):
    on, _ = tiny_llms

    async def main():
        task = asyncio.create_task(on.chunks.aadd(_random_ids(30, 300)))
        await asyncio.sleep(0)  # submitted, not finished
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        chunk = await on.chunks.aadd(_random_ids(31, 20))
        return chunk

    chunk = asyncio.run(main())
    assert len(on.chunks) == 1 and on.cache_stats()["pinned"] == 2
    chunk.release()
    assert _idle(on)


def test_close_releases_chunks(tiny_model):
    _, path, _ = tiny_model
    llm = LLM(model=path, device="cpu", dtype="float32", page_size=PS, num_kv_pages=16, progress=False)
    chunk = llm.chunks.add(_random_ids(40, 20))
    llm.close()
    assert chunk.released and len(llm.chunks) == 0


@pytest.mark.parametrize("use_async", [False, True], ids=["add", "aadd"])
def test_an_add_racing_close_raises_instead_of_returning_a_live_looking_chunk(tiny_model, monkeypatch, use_async):
    _, path, _ = tiny_model
    llm = LLM(model=path, device="cpu", dtype="float32", page_size=PS, num_kv_pages=16, progress=False)
    client = llm.chunks._client
    name = "aprefill_and_pin" if use_async else "prefill_and_pin"
    prefill = getattr(client, name)

    def close_midway(pages):  # the prefill has pinned its pages; another thread closes the LLM before the handle
        llm.close()
        return pages

    if use_async:
        async def racing(*args, **kw):
            return close_midway(await prefill(*args, **kw))
    else:
        def racing(*args, **kw):
            return close_midway(prefill(*args, **kw))
    monkeypatch.setattr(client, name, racing)
    with pytest.raises(EngineDeadError, match="closed while chunk"):
        if use_async:
            asyncio.run(llm.chunks.aadd(_random_ids(41, 20)))
        else:
            llm.chunks.add(_random_ids(41, 20))
    assert len(llm.chunks) == 0 and not llm.alive
    with pytest.raises(EngineDeadError):
        llm.chunks.add(_random_ids(42, 20))


def test_system_message_chunk_is_exact_on_the_embedded_model(embedded_gguf):
    system = [{"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."}]
    questions = ["What is the capital of France?", "Name a primary colour."]
    params = SamplingParams(temperature=0, max_tokens=12)
    kw = dict(device="cpu", page_size=PS, num_kv_pages=256, progress=False)
    with LLM(model=embedded_gguf, **kw) as on, LLM(model=embedded_gguf, enable_prefix_caching=False, **kw) as off:
        chunk = on.chunks.add_messages(system)
        for q in questions:
            messages = system + [{"role": "user", "content": q}]
            got = on.chat(messages, params, chunks=chunk)
            want = off.chat(messages, params)
            assert got.token_ids == want.token_ids
            assert got.usage.cached_prompt_tokens >= chunk.num_prefix_tokens // PS * PS
        other = [{"role": "system", "content": "Be verbose."}, {"role": "user", "content": "Hi"}]
        with pytest.raises(InvalidRequestError, match="does not start with the given chunks"):
            on.chat(other, params, chunks=chunk)
        turn = on.chunks.add_messages(system + [{"role": "user", "content": questions[0]}], after=chunk, kind="turn")
        assert turn.prefix_token_ids == on.apply_chat_template(
            system + [{"role": "user", "content": questions[0]}], add_generation_prompt=False)
        on.chunks.release_all()
        assert _idle(on)


def _capture_first_logprobs(llm: LLM, prompt, **kwargs) -> torch.Tensor:
    """The log-distribution the engine samples the first token from (recorded at the sampler's input)."""
    inner, rows = llm.engine.sampler, []

    def record(logits, params, generators, **kwargs):
        rows.append(logits.float().log_softmax(-1)[0].clone())
        return inner(logits, params, generators, **kwargs)

    llm.engine.sampler = record
    try:
        llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1), **kwargs)
    finally:
        llm.engine.sampler = inner
    return rows[0]


def test_composed_prompt_equals_block_diagonal_attention_in_transformers(tiny_llms, tiny_model):
    """Independent chunks composed in any order = the whole prompt computed with each chunk attending only to
    itself and the text after them attending to everything (transformers with that 4D mask, positions 0..N-1)."""
    on, _ = tiny_llms
    _, _, ref = tiny_model
    system = on.chunks.add(_random_ids(50, 10), kind="system", independent=True)
    a = on.chunks.add(_random_ids(51, 7), independent=True)
    b = on.chunks.add(_random_ids(52, 13), independent=True)
    assert [len(c.pages) for c in (system, a, b)] == [2, 1, 2]  # independent chunks keep their partial page
    question = _random_ids(53, 5)
    for order in ([system, b, a], [system, a, b], [a, system, b]):
        got = _capture_first_logprobs(on, question, chunks=order)
        full = [t for c in order for t in c.token_ids] + question
        n, mask, start = len(full), torch.zeros(len(full), len(full), dtype=torch.bool), 0
        for chunk in order:
            end = start + chunk.num_tokens
            mask[start:end, start:end] = torch.ones(chunk.num_tokens, chunk.num_tokens).tril().bool()
            start = end
        mask[start:] = torch.ones(n, n).tril().bool()[start:]
        with torch.no_grad():
            logits = ref(torch.tensor([full]), attention_mask=mask[None, None],
                         position_ids=torch.arange(n)[None]).logits[0, -1]
        want = logits.float().log_softmax(-1)
        assert (got - want).abs().max() < 1e-4
        exact = _capture_first_logprobs(on, full)  # the exact prompt differs: composition is an approximation
        assert (exact - want).abs().max() > 1e-3
    out = on.generate(question, GREEDY, chunks=[system, b, a])[0]
    assert out.usage.cached_prompt_tokens == 30 and len(out.token_ids) == GREEDY.max_tokens
    for chunk in (system, a, b):
        chunk.release()
    assert _idle(on)


def test_composed_prompts_are_never_cached_and_reject_mixing(tiny_llms):
    on, _ = tiny_llms
    a = on.chunks.add(_random_ids(60, 16), independent=True)
    exact = on.chunks.add(_random_ids(61, 16))
    question = _random_ids(62, 4)
    on.generate(question, GREEDY, chunks=[a])
    # The same tokens as an ordinary prompt find nothing of the composed request in the cache.
    plain = on.generate(a.token_ids + question, GREEDY)[0]
    assert plain.usage.cached_prompt_tokens == 0
    with pytest.raises(InvalidRequestError, match="only independent chunks"):
        on.generate(question, GREEDY, chunks=[a, exact])
    with pytest.raises(InvalidRequestError, match="no parent"):
        on.chunks.add([1, 2, 3], after=exact, independent=True)
    with pytest.raises(InvalidRequestError, match="needs some text"):
        on.generate("", GREEDY, chunks=[a])
    a.release()
    with pytest.raises(InvalidRequestError, match="released"):
        on.generate(question, GREEDY, chunks=[a])
    exact.release()
    assert _idle(on)


def test_a_composed_request_preempted_after_its_chunk_was_released_finishes_as_alone(tiny_model):
    """Releasing a chunk once the request using it runs is allowed: the request holds the chunk's pages to its end,
    so a preemption (its KV recomputed, the chunk's copied in again) still finishes with the tokens it has alone."""
    _, path, _ = tiny_model
    with LLM(model=path, device="cpu", dtype="float32", page_size=PS, num_kv_pages=24, progress=False) as llm:
        chunk = llm.chunks.add(_random_ids(70, 16), independent=True)
        question, params = _random_ids(71, 4), SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
        alone = llm.generate(question, params, chunks=[chunk])[0].token_ids
        hog = llm.stream_deltas(_random_ids(72, 30), SamplingParams(temperature=0, max_tokens=130, ignore_eos=True))
        next(hog)  # runs, and grows to 20 of the 24 pages
        tokens = []
        for delta in llm.stream_deltas(question, params, chunks=[chunk]):
            tokens += delta.token_ids
            if len(tokens) == 1:
                chunk.release()
        assert llm.engine.scheduler.num_preemptions > 0  # the case under test happened
        assert tokens == alone
        assert [d.finish_reason for d in hog][-1] == "length"
        assert _idle(llm)


def test_a_composed_request_whose_kv_copy_fails_fails_alone(tiny_llms, monkeypatch):
    """A failure while a composed prompt's chunk KV is copied in (here injected; a device error, say) ends that
    request alone: a request running beside it finishes with its own tokens, and nothing stays held."""
    on, off = tiny_llms
    chunk = on.chunks.add(_random_ids(80, 12), independent=True)
    other = _random_ids(81, 10)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    def broken(*args):
        raise RuntimeError("injected copy fault")

    monkeypatch.setattr(on.engine.runner, "copy_composed", broken)
    bystander = on.stream_deltas(other, params)
    first = next(bystander)
    with pytest.raises(RequestFailedError, match="injected copy fault"):
        on.generate(_random_ids(82, 4), GREEDY, chunks=[chunk])
    rest = list(bystander)
    assert first.token_ids + [t for d in rest for t in d.token_ids] == off.generate(other, params)[0].token_ids
    chunk.release()
    assert _idle(on)
