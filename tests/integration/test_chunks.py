"""Chunk handles: pinned prompt segments are exact, survive memory pressure, and never leak pages."""
from __future__ import annotations

import asyncio

import pytest
import torch

from braidinfer import LLM, SamplingParams
from braidinfer.errors import InvalidRequestError, OutOfPagesError

PS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def _idle(llm: LLM, pinned: int = 0) -> bool:
    s = llm.cache_stats()
    return s["in_use"] == 0 and s["pinned"] == pinned and s["free"] + s["cached"] + s["pinned"] == s["num_pages"]


def _random_ids(seed: int, n: int) -> list[int]:
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def tiny_llms(tiny_model):
    _, path, _ = tiny_model
    kw = dict(device="cpu", dtype="float32", page_size=PS, progress=False)
    on, off = LLM(model=path, num_kv_pages=64, **kw), LLM(model=path, enable_prefix_caching=False, **kw)
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


def test_pins_are_refused_beyond_the_pool_share_and_requests_that_cannot_fit_get_a_clear_error(tiny_model):
    _, path, _ = tiny_model
    with LLM(model=path, device="cpu", dtype="float32", page_size=PS, num_kv_pages=16, max_pinned_fraction=0.5,
             progress=False) as llm:
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


def test_request_sharing_pinned_pages_may_use_them(tiny_model):
    _, path, _ = tiny_model
    with LLM(model=path, device="cpu", dtype="float32", page_size=PS, num_kv_pages=16, max_pinned_fraction=0.5,
             progress=False) as llm:
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
