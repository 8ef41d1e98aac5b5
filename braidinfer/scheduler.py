"""Continuous batching: decide each step which sequences advance by how many tokens.

Running sequences go first (a decode costs one token of the step's budget, an unfinished prefill continues in
chunks), then waiting ones are admitted while the token budget, `max_num_seqs` and the page pool allow. When a
running sequence needs a page and none is left, the most recently admitted sequences are preempted: their pages
go back (full ones stay in the prefix cache) and they are recomputed later. Plain Python: no torch here.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from braidinfer.kv.page_manager import PageManager
from braidinfer.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """The sequences of one step and how many new tokens of each the step computes."""

    seqs: list[Sequence]
    num_new_tokens: list[int]

    def __len__(self) -> int:
        return len(self.seqs)

    def drop_finished(self) -> None:
        """Removes sequences that ended after being scheduled (e.g. a composed prompt whose chunk was released)."""
        keep = [i for i, s in enumerate(self.seqs) if not s.is_finished]
        self.seqs = [self.seqs[i] for i in keep]
        self.num_new_tokens = [self.num_new_tokens[i] for i in keep]


class Scheduler:
    def __init__(self, pages: PageManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.pages = pages
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._rejected: list[tuple[Sequence, str]] = []
        self._composing: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def take_composing(self) -> list[Sequence]:
        """Sequences admitted this step whose composed chunks' KV must be copied in before the forward."""
        composing, self._composing = self._composing, []
        return composing

    def take_rejected(self) -> list[tuple[Sequence, str]]:
        """Waiting sequences that can never fit next to the pinned pages, or that cannot get their pages while
        nothing runs that could give pages back, with the reason (the caller fails them)."""
        rejected, self._rejected = self._rejected, []
        return rejected

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [])
        budget = self.max_num_batched_tokens
        preempted = self._schedule_running(batch, budget)
        budget -= sum(batch.num_new_tokens)
        if not preempted:
            self._admit_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> bool:
        preempted, i = False, 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_pending_tokens and seq.num_output_tokens + seq.num_pending_tokens >= seq.max_tokens:
                i += 1  # its last token is on the way: nothing more to compute
                continue
            # (A token on the way that turns out to be a stop token ends the request after its next step has been
            # scheduled: that step's token, and any page reserved for it, are given back when it is processed.)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self._reserve(seq, seq.num_computed_tokens + n):
                preempted = True
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
            i += 1
        return preempted

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        stuck: dict[int, int] = {}  # id -> pages needed, of those unable to go on with nothing running, this step
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending_tokens:  # preempted with a token in flight: admitted once it is on the host
                break
            fresh = not seq.page_table
            if fresh:
                if seq.private:  # no cache lookup; a composed prompt's chunks are copied in (take_composing)
                    seq.num_computed_tokens = seq.num_composed_tokens
                else:
                    self._match_prefix(seq)
                problem = self._never_fits(seq)
                if problem:
                    self.waiting.popleft()
                    self._release(seq)
                    self._rejected.append((seq, problem))
                    if self._held_pages(seq):
                        break  # its end gives its pages back to those behind it, next step
                    continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if self.running:
                if not self._reserve(seq, seq.num_computed_tokens + n):
                    self._release(seq)
                    break  # pages come back as the running ones finish
            elif not (self._fits_alone(seq) and self._reserve(seq, seq.num_computed_tokens + n)):
                # Nothing runs, so nothing gives pages back but the composed prompts waiting behind it, at their end
                # (the rest are pinned). Admitted for its next chunk only, it would preempt itself for ever when it
                # needs the rest: one of those goes first instead, if it has not been found unable to as well.
                stuck[id(seq)] = self.pages.pages_for(seq.max_kv_tokens) - len(seq.page_table)
                self._release(seq)
                holder = next((s for s in self.waiting if id(s) not in stuck and self._held_pages(s)), None)
                if holder is not None:
                    self.waiting.remove(holder)
                    self.waiting.appendleft(holder)
                    continue
                # Waiting would spin the engine forever with every later request behind it. Of those found unable
                # to go on, the one holding the most pages fails: its end gives the most back.
                victim = max((s for s in self.waiting if id(s) in stuck), key=lambda s: len(self._held_pages(s)))
                self.waiting.remove(victim)
                self._rejected.append((victim, f"request needs up to {stuck[id(victim)]} more KV pages but only "
                                               f"{self.pages.num_available} of the pool's {self.pages.num_pages} can "
                                               "be had (the others are held by chunks); release chunks or lower "
                                               "max_tokens"))
                if self._held_pages(victim):
                    break  # its end gives its pages back to those behind it, next step
                continue
            self.waiting.popleft()
            if fresh and seq.compose:
                self._composing.append(seq)
            elif fresh and not seq.private and seq.num_cached_prompt_tokens is None:  # not a preempted one's return
                self.pages.count_lookup(seq.num_tokens - 1, seq.num_computed_tokens)  # what _match_prefix found
            if seq.num_cached_prompt_tokens is None:
                seq.num_cached_prompt_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n

    def _fits_alone(self, seq: Sequence) -> bool:
        """Whether the pages `seq` can have now (besides those it holds) take all its KV to its end."""
        return self.pages.pages_for(seq.max_kv_tokens) - len(seq.page_table) <= self.pages.num_available

    def _held_pages(self, seq: Sequence) -> set[int]:
        """The pages of released chunks that `seq` holds, which only its end gives back (see `finish`)."""
        return {p for pages in seq.composed_pages or () for p in pages if not self.pages.pin_counts[p]}

    def _match_prefix(self, seq: Sequence) -> None:
        # The last token is always computed: its logits give the next token.
        chain = self.pages.match_prefix(seq.token_ids, seq.num_tokens - 1)
        seq.page_table = [node.page for node in chain]
        seq.num_computed_tokens = len(chain) * self.pages.page_size
        seq.num_committed_pages = len(chain)
        seq.last_node = chain[-1] if chain else None

    def _never_fits(self, seq: Sequence) -> str | None:
        """Why `seq` (just matched against the cache) can never run next to the pinned pages, or None if it can."""
        pm = self.pages
        need = pm.pages_for(seq.max_kv_tokens)
        usable = self._usable_pages(seq, pm.num_pinned)
        if need <= usable:
            return None
        return (f"request needs up to {need} KV pages ({seq.num_prompt_tokens} prompt + {seq.max_tokens} output "
                f"tokens) but only {usable} of the pool's {pm.num_pages} are not pinned by chunks; release chunks or "
                "lower max_tokens")

    def starved_by_pin(self, pages: list[int]) -> str | None:
        """Why pinning `pages` would take the room that a started request (running, or preempted and waiting to go
        on) needs to finish, or None. It was admitted next to the pins it saw; left too few pages by a later pin, it
        would fail midway, its output begun, once preempted. One that lacks the room already is not counted:
        refusing the pin would not save it."""
        pm = self.pages
        pinning = frozenset(pages)
        num_pinned = pm.num_pinned + pm.num_new_pins(pages)
        for seq in (*self.running, *self.waiting):
            if seq.num_cached_prompt_tokens is None or seq.prefill_only or seq.is_finished:
                continue  # not started, or a chunk's prefill (it ends with its pin)
            need, left = pm.pages_for(seq.max_kv_tokens), self._usable_pages(seq, num_pinned, pinning)
            if left < need <= self._usable_pages(seq, pm.num_pinned):
                return (f"cannot pin {len(pages)} KV pages now: request {seq.request_id} needs up to {need} of the "
                        f"pool's {pm.num_pages} and would be left {left}; pin again once it has ended")
        return None

    def _usable_pages(self, seq: Sequence, num_pinned: int, pinning: frozenset[int] = frozenset()) -> int:
        """The pages `seq` can ever have with `num_pinned` pages pinned (`pinning` about to be): not those pinned,
        unless its prefix shares them (its page table, or when preempted the cached prefix it will match), nor
        those of released chunks that a composed prompt holds (see `finish`)."""
        pm = self.pages
        held = self._held_pages(seq)
        own = seq.page_table
        if not own and not seq.private:
            own = pm.cached_pages(seq.token_ids, seq.num_tokens - 1)
        shared = sum(1 for p in own if pm.pin_counts[p] or p in pinning)
        return pm.num_pages - num_pinned - len(held) + shared

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Makes seq.page_table cover `num_tokens` slots; False if the pool cannot."""
        need = self.pages.pages_for(num_tokens) - len(seq.page_table)
        if need <= 0:
            return True
        if need > self.pages.num_available:
            return False
        seq.page_table.extend(self.pages.allocate(need))
        return True

    def commit(self, seq: Sequence) -> None:
        """Publishes the sequence's computed full pages in the prefix cache (never private KV)."""
        if seq.private:
            return
        seq.num_committed_pages, seq.last_node = self.pages.commit(
            seq.token_ids, seq.num_computed_tokens, seq.page_table, seq.num_committed_pages, seq.last_node
        )

    def _release(self, seq: Sequence) -> None:
        self.commit(seq)
        self.pages.release(seq.page_table)
        seq.reset_kv()

    def preempt(self, seq: Sequence) -> None:
        """Returns a running sequence's pages and puts it back in line, ahead of every sequence not preempted; it will
        be recomputed (prompt + output). Preempted composed prompts stay ahead of all others: they hold their chunks'
        pages (see `finish`), which only they can use, so a sequence waiting ahead of one for pages could wait forever
        once a chunk is released (its pages then neither pinned, cached nor free)."""
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        if seq.composed_pages is not None:
            self.waiting.appendleft(seq)
        else:
            holding = next((i for i, s in enumerate(self.waiting) if s.composed_pages is None), len(self.waiting))
            self.waiting.insert(holding, seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence (running or waiting); its full pages stay cached for later prompts."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        if seq.composed_pages is not None:  # the chunks' pages it held since its first admission
            self.pages.release([p for pages in seq.composed_pages for p in pages])
            seq.composed_pages = None
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
