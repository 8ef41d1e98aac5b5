"""Postprocessing on the engine thread: a step's sampled tokens are appended to their requests, checked against the
stop conditions, detokenized and emitted to each request's sink as `CompletionDelta`s; finished requests leave the
scheduler (their pages go back to the prefix cache)."""
from __future__ import annotations

import logging
from typing import Any

from braidinfer.errors import BraidError, RequestFailedError
from braidinfer.outputs import CompletionDelta, Usage
from braidinfer.scheduler import Scheduler
from braidinfer.sequence import Sequence

log = logging.getLogger(__name__)


class OutputProcessor:
    def __init__(self, scheduler: Scheduler, requests: dict[str, Sequence], eos_token_ids: frozenset[int],
                 max_model_len: int):
        self.scheduler, self.requests = scheduler, requests
        self.eos_token_ids, self.max_model_len = eos_token_ids, max_model_len

    def process(self, sampled: list[Sequence], token_ids: list[int], logprobs: list) -> None:
        """Appends one sampled token to each sequence (row order). A request whose postprocessing (detokenizer,
        grammar) breaks ends alone; the others still get their tokens."""
        for seq, token, lp in zip(sampled, token_ids, logprobs):
            if seq.is_finished:  # aborted, failed, or ended by the token before
                continue
            try:
                self.append(seq, token, lp)
            except Exception as e:
                log.exception("request %s failed", seq.request_id)
                try:
                    self.fail(seq, e)
                except Exception:  # its sink cannot take the news either
                    log.exception("could not end request %s", seq.request_id)

    def append(self, seq: Sequence, token: int, logprobs: Any) -> None:
        seq.token_ids.append(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        params, det = seq.params, seq.detokenizer
        # A grammar that has reached its end only allows stop tokens, so a terminated matcher ends the request.
        if seq.matcher is not None and not seq.matcher.accept_token(token):  # the mask forbade it: a bug, not a stop
            raise RuntimeError(f"token {token} was sampled although the request's grammar forbids it")
        grammar_done = seq.matcher is not None and seq.matcher.is_terminated()
        if grammar_done or token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            reason, delta = "stop", det.flush()  # the stop token itself is never part of the text
        else:
            delta, stopped = det.add(token)
            reason = "stop" if stopped else None
            if reason is None and (seq.num_output_tokens >= seq.max_tokens or len(seq.token_ids) >= self.max_model_len):
                delta += det.flush()  # the text it held back may complete a stop string, which then ends it
                reason = "stop" if det.stopped else "length"
        if reason is None:
            self.emit(seq, delta, [token], logprobs)
        else:
            self.finish(seq, reason, delta, [token], logprobs)

    def finish(self, seq: Sequence, reason: str, delta: str, token_ids: list[int] | None = None,
               logprobs: Any = None, error: BaseException | None = None) -> None:
        """Ends a request: it leaves the scheduler (pages released) and its last delta carries reason and usage."""
        self.scheduler.finish(seq, reason)
        self.requests.pop(seq.request_id, None)
        self.emit(seq, delta, token_ids or [], logprobs, reason, error)

    def fail(self, seq: Sequence, error: BaseException) -> None:
        """Ends one request with an error (a BraidError as is, anything else wrapped) and frees its pages."""
        if seq.is_finished:
            return
        wrapped = error if isinstance(error, BraidError) else RequestFailedError(
            f"request {seq.request_id} failed inside the engine: {type(error).__name__}: {error}")
        if wrapped is not error:
            wrapped.__cause__ = error
        self.finish(seq, "error", "", error=wrapped)

    @staticmethod
    def emit(seq: Sequence, delta: str, token_ids: list[int], logprobs: Any,
             reason: str | None = None, error: BaseException | None = None) -> None:
        if seq.sink is None:
            return
        usage = None
        if reason is not None:
            usage = Usage(seq.num_prompt_tokens, seq.num_cached_prompt_tokens or 0, seq.num_output_tokens)
        seq.sink(CompletionDelta(seq.request_id, delta, token_ids, reason, usage,
                                 [logprobs] if logprobs is not None else [], error))
