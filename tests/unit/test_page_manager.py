"""Page pool + prefix tree bookkeeping, checked against a plain model of what each page should be."""
from __future__ import annotations

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from braidinfer.errors import OutOfPagesError
from braidinfer.kv.page_manager import PageManager

PS = 4


def _hold(pm: PageManager, tokens: list[int]) -> dict:
    """What a sequence does: match a prefix, allocate the rest, commit its full pages."""
    chain = pm.match_prefix(tokens, len(tokens) - 1)
    pages = [n.page for n in chain]
    pages += pm.allocate(pm.pages_for(len(tokens)) - len(pages))
    committed, last = pm.commit(tokens, len(tokens), pages, len(chain), chain[-1] if chain else None)
    return {"tokens": tokens, "pages": pages}


def test_match_returns_longest_full_page_prefix():
    pm = PageManager(num_pages=10, page_size=PS)
    a = _hold(pm, list(range(10)))  # pages: [0..3] [4..7] [8, 9]
    pm.release(a["pages"])
    chain = pm.match_prefix(list(range(8)) + [99, 98], 9)
    assert [n.page for n in chain] == a["pages"][:2]
    assert pm.match_prefix([0, 1, 2, 7, 4, 5, 6, 7], 7) == []  # differs inside the first page
    assert len(pm.match_prefix(list(range(8)), 7)) == 1  # at most 7 tokens may come from the cache


def test_release_caches_full_pages_and_frees_partial_ones():
    pm = PageManager(num_pages=10, page_size=PS)
    a = _hold(pm, list(range(10)))
    pm.release(a["pages"])
    assert pm.stats()["cached"] == 2 and pm.num_free == 8


def test_eviction_is_lru_and_leaves_first():
    pm = PageManager(num_pages=4, page_size=PS)
    a = _hold(pm, list(range(8)))  # 2 pages, a chain
    b = _hold(pm, list(range(100, 108)))  # 2 pages, used later
    pm.release(a["pages"])
    pm.release(b["pages"])
    pm.match_prefix(list(range(100, 108)) + [1], 8)  # touch b (and hold it)
    got = pm.allocate(2)
    assert sorted(got) == sorted(a["pages"])  # a was least recently used: its leaf then its root go
    with pytest.raises(OutOfPagesError):
        pm.allocate(1)


def test_duplicate_block_adopts_the_cached_page():
    pm = PageManager(num_pages=8, page_size=PS)
    tokens = list(range(12))
    x = pm.allocate(2)
    y = pm.allocate(3)
    y_own = list(y)
    pm.commit(tokens, 8, x, 0, None)
    n, last = pm.commit(tokens, 12, y, 0, None)  # the first two blocks were computed twice concurrently
    assert n == 3 and y[:2] == x and y[2] == y_own[2] and last.page == y[2]
    assert pm.num_free == 3 + 2  # y's duplicate pages went straight back
    pm.release(x)
    pm.release(y)
    assert pm.stats()["cached"] == 3 and [n.page for n in pm.match_prefix(tokens + [0], 12)] == y


def test_caching_disabled_never_matches():
    pm = PageManager(num_pages=8, page_size=PS, enable_prefix_caching=False)
    a = _hold(pm, list(range(8)))
    pm.release(a["pages"])
    assert pm.match_prefix(list(range(8)), 7) == [] and pm.num_free == 8


class PagePoolMachine(RuleBasedStateMachine):
    """Random sequences share prefixes, grow, finish; after every step the books must balance."""

    def __init__(self):
        super().__init__()
        self.pm = PageManager(num_pages=12, page_size=PS)
        self.live: list[dict] = []

    @rule(prefix=st.integers(0, 3), length=st.integers(1, 14), salt=st.integers(0, 2))
    def start(self, prefix, length, salt):
        tokens = [prefix] * 5 + [salt] * 3 + list(range(length))
        need_max = self.pm.pages_for(len(tokens))
        if need_max > self.pm.num_available:
            return
        self.live.append(_hold(self.pm, tokens))

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100), extra=st.integers(1, 6))
    def grow(self, i, extra):
        seq = self.live[i % len(self.live)]
        tokens = seq["tokens"] + [7] * extra
        need = self.pm.pages_for(len(tokens)) - len(seq["pages"])
        if need > self.pm.num_available:
            return
        seq["pages"] += self.pm.allocate(max(0, need))
        seq["tokens"] = tokens

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def finish(self, i):
        seq = self.live.pop(i % len(self.live))
        self.pm.release(seq["pages"])

    @invariant()
    def books_balance(self):
        pm = self.pm
        held = {}
        for seq in self.live:
            for p in seq["pages"]:
                held[p] = held.get(p, 0) + 1
        for p in range(pm.num_pages):
            assert pm.ref_counts[p] == held.get(p, 0)
        free = set(pm.free_pages)
        assert len(free) == len(pm.free_pages)
        assert not free & set(held) and not free & set(pm.tree.node_of_page)
        cached = {p for p in pm.tree.node_of_page if p not in held}
        assert pm.num_cached == len(cached)
        assert len(free) + len(cached) + len(held) == pm.num_pages

    def teardown(self):
        for seq in self.live:
            self.pm.release(seq["pages"])
        assert self.pm.num_free + self.pm.num_cached == self.pm.num_pages
        self.pm.allocate(self.pm.num_pages)  # everything cached can be evicted


TestPagePool = PagePoolMachine.TestCase
TestPagePool.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
