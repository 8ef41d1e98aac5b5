"""A radix tree over page-aligned token blocks: each node is one full page of KV for one exact token prefix.

A node's key is the tuple of `page_size` token ids it holds; the path from the root spells the whole prefix, so two
prompts share a node only when every earlier token (and so every position) is identical. Reuse is therefore exact.
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence


class PrefixNode:
    __slots__ = ("key", "page", "parent", "children", "last_access")

    def __init__(self, key: tuple[int, ...], page: int, parent: PrefixNode | None):
        self.key = key
        self.page = page
        self.parent = parent
        self.children: dict[tuple[int, ...], PrefixNode] = {}
        self.last_access = 0


class PrefixTree:
    """Finds the longest cached page-aligned prefix, records new full pages, and picks LRU leaves to evict.

    The tree does not own reference counts: `evict` asks a callback whether a page is referenced.
    """

    def __init__(self, page_size: int):
        self.page_size = page_size
        self.root = PrefixNode((), -1, None)
        self.node_of_page: dict[int, PrefixNode] = {}
        self._clock = itertools.count(1)
        self._lru: list[tuple[int, int, PrefixNode]] = []  # (last_access, tiebreak, leaf) min-heap, lazily pruned

    def __len__(self) -> int:
        return len(self.node_of_page)

    def match(self, token_ids: Sequence[int], max_tokens: int) -> list[PrefixNode]:
        """The chain of nodes covering the longest cached prefix of at most `max_tokens` tokens."""
        node, chain, ps = self.root, [], self.page_size
        for start in range(0, max_tokens - ps + 1, ps):
            node = node.children.get(tuple(token_ids[start : start + ps]))
            if node is None:
                break
            chain.append(node)
        return chain

    def touch(self, chain: Sequence[PrefixNode]) -> None:
        now = next(self._clock)
        for node in chain:
            node.last_access = now

    def insert(self, parent: PrefixNode | None, key: tuple[int, ...], page: int) -> PrefixNode:
        """Adds `page` holding block `key` under `parent` (None = root) and returns the node now holding that block;
        if the block is cached already, the existing node is returned and `page` stays out of the tree."""
        parent = parent or self.root
        node = parent.children.get(key)
        if node is not None:
            return node
        node = PrefixNode(key, page, parent)
        node.last_access = next(self._clock)
        parent.children[key] = node
        self.node_of_page[page] = node
        return node

    def push_evictable(self, node: PrefixNode) -> None:
        """Called when a leaf's page loses its last reference: it becomes a candidate for eviction."""
        heapq.heappush(self._lru, (node.last_access, id(node), node))
        if len(self._lru) > 2 * len(self.node_of_page) + 64:
            self._compact()

    def _compact(self) -> None:
        """Drops the heap's stale entries (a leaf pushed again since, or gone from the tree, or now a parent, which
        `_remove` pushes again once it is a leaf): a prefix reused and released over and over is never evicted, and
        its leaf got one more entry per release. Amortised: the heap has at most one entry per node afterwards."""
        live = {}
        for entry in self._lru:
            stamp, key, node = entry
            if stamp == node.last_access and not node.children and self.node_of_page.get(node.page) is node:
                live[key] = entry
        self._lru = list(live.values())
        heapq.heapify(self._lru)

    def evict(self, is_free_leaf) -> int | None:
        """Removes the least recently used unreferenced leaf and returns its page, or None if there is none.

        `is_free_leaf(node)` tells whether the node's page has no references; stale heap entries are skipped.
        """
        while self._lru:
            stamp, _, node = heapq.heappop(self._lru)
            if node.children or self.node_of_page.get(node.page) is not node or stamp != node.last_access:
                continue
            if not is_free_leaf(node):
                continue
            self._remove(node)
            return node.page
        return None

    def _remove(self, node: PrefixNode) -> None:
        parent = node.parent
        del parent.children[node.key]
        del self.node_of_page[node.page]
        if parent is not self.root and not parent.children:
            self.push_evictable(parent)
