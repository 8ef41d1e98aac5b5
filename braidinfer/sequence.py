"""One request's state inside the engine: its tokens, how many have KV, and which pages hold it."""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from braidinfer.kv.prefix_tree import PrefixNode


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class ComposedSegment:
    """An independent chunk inside a composed prompt: its KV (computed at positions 0..num_tokens-1, pinned by
    `pin_owner`) stands for the prompt's tokens [position, position + num_tokens)."""

    position: int
    pin_owner: str
    num_tokens: int


def kv_tokens(num_prompt_tokens: int, max_tokens: int) -> int:
    """Most tokens whose KV a request of this prompt and max_tokens ever holds: the prompt and every output token but
    the last, which is sampled and never fed back (a chunk's prefill, max_tokens 0: its prompt)."""
    return num_prompt_tokens + max(max_tokens - 1, 0)


class Sequence:
    """token_ids = prompt + output. KV exists for token_ids[:num_computed_tokens], in page_table's pages.

    With asynchronous scheduling the next step is launched before the host has the tokens of the step in flight:
    `num_pending_tokens` output tokens are then known only on the device (they count in `num_tokens`, so the
    scheduler plans their KV, and the runner reads them from the device), and are appended to token_ids when the
    step is processed.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: Any, max_tokens: int,
                 sink: Callable[[Any], None] | None = None, prefill_only: bool = False):
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens
        self.sink = sink
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.num_computed_tokens = 0
        self.num_pending_tokens = 0
        self.num_cached_prompt_tokens: int | None = None  # set at first admission, for usage
        self.page_table: list[int] = []
        self.num_committed_pages = 0
        self.last_node: PrefixNode | None = None
        self.generator = None
        self.detokenizer = None
        self.matcher = None  # xgrammar GrammarMatcher when the request is constrained
        self.logprobs: list[Any] = []
        # A chunk's prefill: computes KV for the prompt, samples nothing, and pins the full pages when done.
        self.prefill_only = prefill_only
        self.pin_owner: str | None = None  # who holds the pin once it is taken (the chunk's id)
        self.pinned_pages: list[int] = []
        # Private KV is never shared through the prefix cache (neither matched nor committed): independent chunks,
        # and composed prompts, whose KV is approximate.
        self.private = False
        # A composed prompt: the independent chunks whose KV is copied in at admission; they cover
        # token_ids[:num_composed_tokens].
        self.compose: list[ComposedSegment] = []
        # The pages of each segment's chunk, referenced from the first admission to the end: a chunk released while
        # the request runs stays readable for the recompute after a preemption.
        self.composed_pages: list[tuple[int, ...]] | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens so far, those still on the device included."""
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def max_kv_tokens(self) -> int:
        """Most tokens whose KV this request ever holds: see `kv_tokens`."""
        return kv_tokens(self.num_prompt_tokens, self.max_tokens)

    @property
    def num_composed_tokens(self) -> int:
        """Leading tokens whose KV a composed prompt copies in from its chunks (0 for other prompts)."""
        return sum(segment.num_tokens for segment in self.compose)

    @property
    def num_output_tokens(self) -> int:
        """Output tokens on the host (pending ones not counted)."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def reset_kv(self) -> None:
        """Forget all KV bookkeeping (after the pages were released): the sequence will be recomputed."""
        self.num_computed_tokens = 0
        self.page_table = []
        self.num_committed_pages = 0
        self.last_node = None
