"""Prefix reuse is exact: same greedy output with the cache on and off, and the cached-token counts prove reuse."""
from __future__ import annotations

import pytest
import torch

from braidinfer import LLM, SamplingParams


@pytest.fixture(scope="module")
def llms(tiny_model, async_scheduling):
    """(an LLM with the prefix cache, scheduling as `async_scheduling` says; the reference without it). 512 pages
    hold every prompt here with room to spare (the CPU's default 1 GiB pool takes seconds to set up)."""
    _, path, _ = tiny_model
    kw = dict(device="cpu", dtype="float32", page_size=8, num_kv_pages=512, progress=False)
    on = LLM(model=path, async_scheduling=async_scheduling, **kw)
    off = LLM(model=path, enable_prefix_caching=False, **kw)
    yield on, off
    on.close()
    off.close()


def _shared_prefix_prompts():
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, 49152, (70,), generator=g).tolist()
    return [prefix + torch.randint(3, 49152, (n,), generator=g).tolist() for n in (1, 5, 9, 30)]


def test_outputs_identical_with_and_without_cache(llms):
    on, off = llms
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompts = _shared_prefix_prompts()
    first = on.generate(prompts[0], params)[0]
    assert first.usage.cached_prompt_tokens == 0
    cached = [on.generate(p, params)[0] for p in prompts[1:]]
    plain = [off.generate(p, params)[0] for p in prompts[1:]]
    assert [o.token_ids for o in cached] == [o.token_ids for o in plain]
    # The 70-token shared prefix covers 8 full pages of 8 tokens: all of them come from the cache.
    assert [o.usage.cached_prompt_tokens for o in cached] == [64, 64, 64]
    assert all(o.usage.cached_prompt_tokens == 0 for o in plain)


def test_a_finished_conversation_is_reused_with_its_output(llms):
    on, off = llms
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompt = _shared_prefix_prompts()[3]
    first = on.generate(prompt, params)[0]
    follow_up = prompt + first.token_ids + [5, 6, 7]
    second = on.generate(follow_up, params)[0]
    # Everything but the last (uncomputed) generated token and the partial last page is served from the cache.
    assert second.usage.cached_prompt_tokens == (len(prompt) + len(first.token_ids) - 1) // 8 * 8
    assert second.token_ids == off.generate(follow_up, params)[0].token_ids


def test_identical_prompt_is_served_from_cache_except_last_token(llms):
    on, _ = llms
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompt = list(range(100, 164))  # exactly 8 pages
    a = on.generate(prompt, params)[0]
    b = on.generate(prompt, params)[0]
    assert a.token_ids == b.token_ids
    assert b.usage.cached_prompt_tokens == 56  # the last page holds the last prompt token, which is recomputed


def test_cache_statistics_count_what_admitted_requests_reused(tiny_model):
    """tokens_served_from_cache and cache_hit_rate add up the admitted requests' usage.cached_prompt_tokens, and
    their lookups: a request waiting for pages (its lookup undone, tried again every step) counts once."""
    _, path, _ = tiny_model
    with LLM(model=path, device="cpu", dtype="float32", page_size=8, num_kv_pages=12, progress=False) as llm:
        g = torch.Generator().manual_seed(4)
        prefix, hog, tail = (torch.randint(3, 49152, (n,), generator=g).tolist() for n in (33, 30, 40))
        llm.generate(prefix, SamplingParams(temperature=0, max_tokens=1))  # 4 full pages of it cached
        pages = llm.engine.pages
        served_before, lookups_before = pages.num_cached_tokens_served, pages.num_lookup_tokens
        # The first request holds 9 of the 12 pages for 40 steps; the second (the prefix, then more) waits.
        outs = llm.generate([hog, prefix + tail], [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                                                   SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)])
        assert llm.engine.scheduler.num_preemptions == 0 and outs[1].usage.cached_prompt_tokens > 0
        stats = llm.cache_stats()
        assert stats["tokens_served_from_cache"] - served_before == sum(o.usage.cached_prompt_tokens for o in outs)
        # each looked up its prompt but the last token, once
        assert pages.num_lookup_tokens - lookups_before == len(hog) - 1 + len(prefix + tail) - 1
        assert stats["cache_hit_rate"] == pytest.approx(stats["tokens_served_from_cache"] / pages.num_lookup_tokens)
