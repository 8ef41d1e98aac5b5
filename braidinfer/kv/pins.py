"""Pins by owner: the chunks' hold on KV pages, keyed by the chunk's id (a plain string), within a budget.

Invariants: every page of a live pin holds one pin count of `PageManager` for that owner; `num_pinned` of the
page manager never exceeds `max_pages` through `pin` (pages shared by several pins count once); an owner id is
pinned at most once. Torch-free; lives on the engine thread.
"""
from __future__ import annotations

from collections.abc import Sequence

from braidinfer.errors import OutOfPagesError
from braidinfer.kv.page_manager import PageManager


class Pins:
    def __init__(self, pages: PageManager, max_pages: int, budget_hint: str = ""):
        self.pages = pages
        self.max_pages = max_pages
        self._budget_hint = budget_hint  # names the setting that sets max_pages, for error messages
        self._owned: dict[str, tuple[int, ...]] = {}

    def pin(self, owner: str, pages: Sequence[int], private: bool = False) -> None:
        """Pins `pages` for `owner`. Cached pages (a root chain of the prefix cache) get a new pinning reference;
        `private` pages (outside the cache, held by the caller) turn the caller's references into the pin.
        Raises OutOfPagesError, pinning nothing, when the pins would exceed the budget."""
        assert owner not in self._owned, f"{owner} is pinned already"
        problem = self.over_budget(pages)
        if problem:
            raise OutOfPagesError(problem)
        if private:
            self.pages.adopt_as_pins(pages)
        else:
            self.pages.pin(pages)
        self._owned[owner] = tuple(pages)

    def over_budget(self, pages: Sequence[int]) -> str | None:
        """Why pinning `pages` would exceed the budget, or None."""
        if self.pages.num_pinned + self.pages.num_new_pins(pages) <= self.max_pages:
            return None
        return (f"cannot pin {len(pages)} more KV pages: chunks already pin {self.pages.num_pinned} and may pin at "
                f"most {self.max_pages} of the pool's {self.pages.num_pages}{self._budget_hint}; release chunks first")

    def unpin(self, owner: str) -> None:
        """Drops `owner`'s pin (a no-op for an owner that holds none, e.g. one released twice)."""
        pages = self._owned.pop(owner, None)
        if pages:
            self.pages.unpin(pages)

    def get(self, owner: str) -> tuple[int, ...] | None:
        """The pages `owner` pins, or None when it holds no pin (never pinned, or released)."""
        return self._owned.get(owner)
