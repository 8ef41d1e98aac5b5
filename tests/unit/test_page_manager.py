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
    return {"tokens": tokens, "pages": pages, "committed": committed, "last": last}


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


def test_pinned_pages_survive_eviction_and_unpin_returns_them_to_the_cache():
    pm = PageManager(num_pages=4, page_size=PS)
    a = _hold(pm, list(range(9)))  # 2 full pages + 1 partial
    chain = a["pages"][:2]
    pm.pin(chain)
    pm.release(a["pages"])
    assert pm.stats()["pinned"] == 2 and pm.num_available == 2
    assert sorted(pm.allocate(2)) == sorted(set(range(4)) - set(chain))  # only unpinned pages can be taken
    with pytest.raises(OutOfPagesError):
        pm.allocate(1)
    pm.unpin(chain)
    assert pm.stats()["pinned"] == 0 and pm.num_cached == 2
    assert [n.page for n in pm.match_prefix(list(range(9)), 8)] == chain


def test_a_page_pinned_twice_stays_pinned_until_both_pins_go():
    pm = PageManager(num_pages=4, page_size=PS)
    a = _hold(pm, list(range(8)))
    pm.pin(a["pages"][:1])
    pm.pin(a["pages"])
    pm.release(a["pages"])
    assert pm.num_pinned == 2 and pm.num_new_pins(a["pages"]) == 0
    pm.unpin(a["pages"][:1])
    assert pm.num_pinned == 2
    pm.unpin(a["pages"])
    assert pm.num_pinned == 0 and pm.num_cached == 2


class PagePoolMachine(RuleBasedStateMachine):
    """Random sequences share prefixes, grow, finish, pin and unpin their committed prefixes (chunks); after every
    step the books must balance and no pinned page may have been evicted."""

    def __init__(self):
        super().__init__()
        self.pm = PageManager(num_pages=12, page_size=PS)
        self.live: list[dict] = []
        self.pins: list[dict] = []  # {"pages": root chain, "keys": the token block each page must still hold}

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
        seq["committed"], seq["last"] = self.pm.commit(tokens, len(tokens), seq["pages"], seq["committed"],
                                                       seq["last"])

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def finish(self, i):
        seq = self.live.pop(i % len(self.live))
        self.pm.release(seq["pages"])

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100), keep=st.integers(1, 4))
    def pin(self, i, keep):
        seq = self.live[i % len(self.live)]
        chain = seq["pages"][: min(keep, seq["committed"])]
        if not chain:
            return
        self.pm.pin(chain)
        keys = [tuple(seq["tokens"][j * PS : (j + 1) * PS]) for j in range(len(chain))]
        self.pins.append({"pages": list(chain), "keys": keys})

    @precondition(lambda self: self.pins)
    @rule(i=st.integers(0, 100))
    def unpin(self, i):
        self.pm.unpin(self.pins.pop(i % len(self.pins))["pages"])

    @invariant()
    def pinned_pages_are_never_evicted(self):
        for pin in self.pins:
            for page, key in zip(pin["pages"], pin["keys"]):
                node = self.pm.tree.node_of_page.get(page)
                assert node is not None and node.key == key
        assert self.pm.num_pinned == len({p for pin in self.pins for p in pin["pages"]})

    @invariant()
    def books_balance(self):
        pm = self.pm
        held = {}
        for holder in self.live + self.pins:
            for p in holder["pages"]:
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
        for pin in self.pins:
            self.pm.unpin(pin["pages"])
        assert self.pm.num_pinned == 0
        assert self.pm.num_free + self.pm.num_cached == self.pm.num_pages
        self.pm.allocate(self.pm.num_pages)  # everything cached can be evicted


TestPagePool = PagePoolMachine.TestCase
TestPagePool.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


def test_a_prefix_reused_over_and_over_keeps_the_eviction_heap_bounded_and_lru_order():
    pm = PageManager(num_pages=16, page_size=PS)
    old = _hold(pm, list(range(8)))
    pm.release(old["pages"])
    for _ in range(2000):  # e.g. one system prompt, request after request: never evicted
        pm.release(_hold(pm, list(range(100, 108)) + [1])["pages"])
    assert len(pm.tree._lru) <= 2 * len(pm.tree) + 64  # it had an entry per release: 2,000 and more
    pm.allocate(pm.num_free)
    assert sorted(pm.allocate(2)) == sorted(old["pages"])  # the least recently used prefix goes first
