"""Reference-counted KV pages with a prefix cache on top.

A page is in exactly one state: free (on the free list), in use (refcount > 0), or cached (refcount 0 but held by the
prefix tree, evictable in LRU order). Holders of pages (sequences and pinned chunks) always hold a whole chain from the
root of the prefix tree, so an unreferenced cached page never has a referenced descendant and every cached page can
be reclaimed by evicting leaves first. A pin is a reference like any other, counted separately so that the pool can
say how many pages chunks keep and refuse pins that would leave too little room to serve requests.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from braidinfer.errors import OutOfPagesError
from braidinfer.kv.prefix_tree import PrefixNode, PrefixTree


class PageManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need at least one page of at least one token (got {num_pages} x {page_size})")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_pages
        self.free_pages: deque[int] = deque(range(num_pages))
        self.tree = PrefixTree(page_size)
        self._num_cached = 0  # tree pages with refcount 0
        self.pin_counts = [0] * num_pages
        self.num_pinned = 0  # pages with a pin
        self.num_cached_tokens_served = 0
        self.num_lookup_tokens = 0

    # --- queries -------------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free_pages)

    @property
    def num_cached(self) -> int:
        """Pages held only by the prefix cache (reclaimable)."""
        return self._num_cached

    @property
    def num_available(self) -> int:
        """Pages an allocation can obtain: free ones plus evictable cached ones."""
        return self.num_free + self.num_cached

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    # --- prefix cache ----------------------------------------------------------------------------------------
    def match_prefix(self, token_ids: Sequence[int], max_tokens: int) -> list[PrefixNode]:
        """Longest cached chain for a prefix of at most `max_tokens` tokens; takes a reference on each page. Counted
        in the hit rate only by `count_lookup`, once the request that looked is admitted."""
        if not self.enable_prefix_caching:
            return []
        chain = self.tree.match(token_ids, max_tokens)
        self.tree.touch(chain)
        for node in chain:
            self._acquire(node.page)
        return chain

    def count_lookup(self, num_tokens: int, num_served: int) -> None:
        """Counts an admitted request's lookup (`stats`' hit rate): `num_served` of the `num_tokens` it looked up came
        from the cache. A lookup undone because the request could not be admitted yet is not counted."""
        if self.enable_prefix_caching:
            self.num_lookup_tokens += num_tokens
            self.num_cached_tokens_served += num_served

    def cached_prefix_length(self, token_ids: Sequence[int], max_tokens: int) -> int:
        """Tokens in the longest cached prefix of at most `max_tokens` tokens (whole pages), looked up only: no
        reference is taken and nothing is touched."""
        return len(self.cached_pages(token_ids, max_tokens)) * self.page_size

    def cached_pages(self, token_ids: Sequence[int], max_tokens: int) -> list[int]:
        """The pages of the longest cached prefix of at most `max_tokens` tokens, looked up only."""
        if not self.enable_prefix_caching:
            return []
        return [node.page for node in self.tree.match(token_ids, max_tokens)]

    def commit(self, token_ids: Sequence[int], num_tokens: int, page_table: Sequence[int], num_committed: int,
               last_node: PrefixNode | None) -> tuple[int, PrefixNode | None]:
        """Records the full pages of a computed prefix in the tree.

        token_ids[:num_tokens] have their KV in page_table; the first `num_committed` pages are in the tree already,
        ending at `last_node`. Returns the new (num_committed, last_node). A block the tree already holds in another
        page (two sequences computed it at once) is deduplicated: page_table switches to the cached page, whose KV is
        that of the same tokens at the same positions, and the duplicate page is released.
        """
        if not self.enable_prefix_caching:
            return num_committed, last_node
        ps = self.page_size
        num_full = min(len(page_table), num_tokens // ps)
        for i in range(num_committed, num_full):
            node = self.tree.insert(last_node, tuple(token_ids[i * ps : (i + 1) * ps]), page_table[i])
            if node.page != page_table[i]:
                self._acquire(node.page)
                self.release([page_table[i]])
                page_table[i] = node.page
            last_node, num_committed = node, i + 1
        return num_committed, last_node

    def acquire(self, pages: Sequence[int]) -> None:
        """Takes one more reference on each of `pages`, held already (`release` drops it)."""
        for p in pages:
            assert self.ref_counts[p] > 0, f"page {p} is not held"
            self._acquire(p)

    def _acquire(self, page: int) -> None:
        self._num_cached -= self.ref_counts[page] == 0
        self.ref_counts[page] += 1

    # --- allocation -------------------------------------------------------------------------------------------
    def allocate(self, num: int) -> list[int]:
        """`num` fresh pages with refcount 1, evicting LRU cached pages if the free list runs short."""
        if num > self.num_available:
            raise OutOfPagesError(f"need {num} KV pages, only {self.num_available} can be freed")
        while len(self.free_pages) < num:
            page = self.tree.evict(lambda n: self.ref_counts[n.page] == 0)
            assert page is not None, "cached page count and tree disagree"
            self._num_cached -= 1
            self.free_pages.append(page)
        pages = [self.free_pages.popleft() for _ in range(num)]
        for p in pages:
            self.ref_counts[p] = 1
        return pages

    # --- pins (chunks) ------------------------------------------------------------------------------------------
    def pin(self, pages: Sequence[int]) -> None:
        """Takes a pinning reference on each page (a root chain of cached pages): they are never evicted until
        `unpin`."""
        missing = [p for p in pages if p not in self.tree.node_of_page]
        assert not missing, f"pages {missing} are not in the prefix cache"
        for p in pages:
            self._acquire(p)
        self.adopt_as_pins(pages)

    def adopt_as_pins(self, pages: Sequence[int]) -> None:
        """Turns the caller's references on `pages` (private pages, outside the prefix cache) into pins."""
        for p in pages:
            assert self.ref_counts[p] > 0, f"page {p} is not held"
            self.num_pinned += self.pin_counts[p] == 0
            self.pin_counts[p] += 1

    def unpin(self, pages: Sequence[int]) -> None:
        """Drops the pins of `pin(pages)`; the pages stay cached (evictable) once nothing else holds them."""
        for p in pages:
            assert self.pin_counts[p] > 0, f"page {p} unpinned more often than pinned"
            self.pin_counts[p] -= 1
            self.num_pinned -= self.pin_counts[p] == 0
        self.release(pages)

    def num_new_pins(self, pages: Sequence[int]) -> int:
        """How many of `pages` are not pinned yet (what pinning them would add to `num_pinned`)."""
        return sum(1 for p in set(pages) if self.pin_counts[p] == 0)

    def release(self, pages: Sequence[int]) -> None:
        """Drops one reference on each page; unreferenced pages go to the cache if the tree holds them, else free."""
        for p in pages:
            assert self.ref_counts[p] > 0, f"page {p} released more often than acquired"
            self.ref_counts[p] -= 1
            if self.ref_counts[p] > 0:
                continue
            node = self.tree.node_of_page.get(p)
            if node is None:
                self.free_pages.append(p)
            else:
                self._num_cached += 1
                if not node.children:
                    self.tree.push_evictable(node)

    def stats(self) -> dict[str, int | float]:
        cached = self.num_cached
        return {
            "num_pages": self.num_pages,
            "free": self.num_free,
            "cached": cached,
            "pinned": self.num_pinned,
            "in_use": self.num_pages - self.num_free - cached - self.num_pinned,
            "cache_hit_rate": self.num_cached_tokens_served / self.num_lookup_tokens if self.num_lookup_tokens else 0.0,
            "tokens_served_from_cache": self.num_cached_tokens_served,
        }
