"""The single-threaded engine core: schedule -> run the model -> sample -> postprocess, step after step (with
asynchronous scheduling, a step's postprocessing runs once the next step is queued on the device).

Not thread-safe: `LLM` owns one engine in one loop thread and feeds it requests from any thread.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from braidinfer.chat_template import require_valid_unicode
from braidinfer.config import EngineConfig
from braidinfer.detokenizer import IncrementalDetokenizer
from braidinfer.errors import BraidError, InvalidRequestError, OutOfPagesError, RequestFailedError
from braidinfer.guided import GrammarCompiler, apply_token_masks
from braidinfer.kv.page_manager import PageManager
from braidinfer.loader import resolve_model
from braidinfer.models import ModelConfig, model_class
from braidinfer.outputs import CompletionChunk, Usage
from braidinfer.penalties import apply_penalties
from braidinfer.runner import ModelRunner
from braidinfer.sampler import HostTokens, Sampler, SamplerOutput, make_generator
from braidinfer.sampling_params import SamplingParams
from braidinfer.scheduler import ScheduledBatch, Scheduler
from braidinfer.sequence import Sequence
from braidinfer.weights import load_model

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.source = resolve_model(config.model)
        self.model_config = ModelConfig.from_hf_config(self.source.hf_config)
        cls = model_class(self.model_config)  # fails fast on an unsupported architecture
        self.device = _pick_device(config.device)
        self.dtype = _DTYPES[config.dtype] if config.dtype != "auto" else (
            torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.tokenizer = self.source.load_tokenizer()
        self.model = load_model(cls, self.model_config, self.source, self.device, self.dtype, config.progress)
        if config.fused_kernels and self.device.type == "cuda":
            self.model.use_fused_kernels()
        self.max_model_len = min(config.max_model_len or 1 << 62, self.model_config.max_position_embeddings)
        self.eos_token_ids = self._eos_token_ids()
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, sorted(self.eos_token_ids))
        num_pages = config.num_kv_pages or self._num_pages_that_fit()
        self.pages = PageManager(num_pages, config.page_size, config.enable_prefix_caching)
        self.max_pinned_pages = int(num_pages * config.max_pinned_fraction)
        self.scheduler = Scheduler(self.pages, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.model_config, num_pages, config.page_size, self.device, self.dtype,
                                  config.attention_backend, config.enforce_eager, config.max_num_seqs,
                                  config.cascade_min_saved_tokens if config.cascade_decode else None)
        self.sampler = Sampler()
        self.generator = make_generator(config.seed, self.device)
        self.requests: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.device.type == "cuda")
        self._in_flight: _Step | None = None  # a launched step whose tokens are not appended yet
        self.last_scheduled: list[Sequence] = []
        """The sequences of the step `step` launched last (those a failing step was running)."""

    # --- requests --------------------------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt (a string is encoded with the tokenizer's special tokens, e.g. BOS, unless
        `add_special_tokens` is False: a prompt that continues after chunks)."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            require_valid_unicode(prompt, "prompt")
            try:
                return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
            except Exception as e:  # named here rather than surfacing from deep inside the tokenizer
                raise InvalidRequestError(f"the tokenizer cannot encode the prompt: {type(e).__name__}: {e}") from e
        if not isinstance(prompt, (list, tuple)):
            raise InvalidRequestError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        ids = list(prompt)
        if not ids:
            raise InvalidRequestError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token ids must be ints in [0, {vocab}); got {bad[:5]}")
        return ids

    def make_sequence(self, prompt: str | list[int], params: SamplingParams | None = None,
                      sink: Callable[[CompletionChunk], None] | None = None,
                      request_id: str | None = None, prefix: list[int] | None = None,
                      compose: list[tuple[int, Any]] | None = None) -> Sequence:
        """Validates a request and builds its sequence, without touching engine state (safe from any thread).

        `prefix`: token ids the prompt continues (chunks); the prompt may then be empty and a string prompt gets no
        leading special tokens. `compose`: (position, independent chunk) pairs whose KV stands for prefix tokens
        (a composed prompt, approximate: private KV, never cached)."""
        if compose and not len(prompt):
            raise InvalidRequestError("a prompt composed from independent chunks needs some text after them")
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be SamplingParams, got {type(params).__name__}")
        if prefix:
            ids = prefix + (self.tokenize(prompt, add_special_tokens=False) if len(prompt) else [])
        else:
            ids = self.tokenize(prompt)
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens but the model's context is {self.max_model_len} tokens "
                "(prompt plus at least one generated token must fit)")
        max_tokens = min(params.max_tokens, self.max_model_len - len(ids))
        capacity = self.pages.num_pages * self.pages.page_size
        if len(ids) + max_tokens > capacity:
            raise InvalidRequestError(
                f"request needs up to {len(ids) + max_tokens} tokens of KV cache but the page pool holds {capacity}; "
                "lower max_tokens or give the engine more KV memory")
        seq = Sequence(request_id or f"req-{next(self._ids)}", ids, params, max_tokens, sink)
        if compose:
            seq.private, seq.compose = True, list(compose)
        seq.generator = make_generator(params.seed, self.device) if params.seed is not None else self.generator
        seq.detokenizer = IncrementalDetokenizer(
            self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens, stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output)
        if params.guided is not None:
            seq.matcher = self.grammars.matcher(params.guided)
        return seq

    def make_prefill(self, token_ids: list[int], sink: Callable[[CompletionChunk], None] | None = None,
                     private: bool = False) -> Sequence:
        """A request that computes the KV of `token_ids` and pins its full pages (a chunk), sampling nothing.
        `private`: computed on its own at positions 0.., outside the prefix cache, keeping every page (an
        independent chunk for composed prompts)."""
        ids = self.tokenize(token_ids)
        if not self.config.enable_prefix_caching:
            raise InvalidRequestError("chunks need the prefix cache: create the LLM with enable_prefix_caching=True")
        if len(ids) > self.max_model_len:
            raise InvalidRequestError(f"chunk prefix has {len(ids)} tokens but the model's context is "
                                      f"{self.max_model_len} tokens")
        pages = self.pages.pages_for(len(ids)) if private else len(ids) // self.pages.page_size
        if pages > self.max_pinned_pages:
            raise InvalidRequestError(
                f"chunk prefix of {len(ids)} tokens needs {pages} pinned KV pages but chunks may pin at most "
                f"{self.max_pinned_pages} of the pool's {self.pages.num_pages} (max_pinned_fraction="
                f"{self.config.max_pinned_fraction})")
        seq = Sequence(f"prefill-{next(self._ids)}", ids, SamplingParams(max_tokens=1), 0, sink, prefill_only=True)
        seq.private = private
        return seq

    def drop_pins(self, seq: Sequence) -> None:
        """Unpins what a chunk prefill pinned (its caller gave up before taking the chunk)."""
        pages, seq.pinned_pages = seq.pinned_pages, []
        self.pages.unpin(pages)

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise InvalidRequestError(f"request id {seq.request_id!r} is already running")
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Ends a request now and frees its pages; unknown or finished ids are ignored."""
        seq = self.requests.get(request_id)
        if seq is not None:
            self._finish(seq, "abort", "")

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    # --- the step ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """Schedule -> run the model -> sample -> append the sampled tokens.

        With asynchronous scheduling a step whose sampled requests need nothing of their previous token on the host
        (no penalties, grammar or logprobs) is left in flight: its tokens are appended during the next step, once
        that step's work is queued behind it on the device (its rows read their input tokens there), so the host's
        work overlaps the GPU's. A request that ends on such a token has had one more token computed, dropped."""
        in_flight, self._in_flight = self._in_flight, None
        try:
            step = self._launch(in_flight)
        finally:
            if in_flight is not None:
                self._process(in_flight)
        if step is None:
            return
        self._advance(step.batch)
        if self.async_scheduling and step.deferrable:
            self._in_flight = step
        else:
            self._process(step)

    def _launch(self, in_flight: _Step | None) -> _Step | None:
        """Schedules the next batch and queues its forward and sampling. Waits for the device only where it must: for
        the previous step's inputs before planning (see ModelRunner), and for logprobs that were asked for."""
        self.last_scheduled = []
        batch = self.scheduler.schedule()
        for seq, reason in self.scheduler.take_rejected():
            self.fail(seq, OutOfPagesError(reason))
        for seq in self.scheduler.take_composing():
            self._compose(seq)
        batch.drop_finished()
        if not batch:
            return None
        self.last_scheduled = list(batch.seqs)
        pending = in_flight.sampled_rows() if in_flight is not None else {}
        rows = [pending.get(id(seq)) for seq in batch.seqs]
        logits, sample_idx = self.runner.run(batch, in_flight.tokens.device_ids if pending else None, rows)
        sampled, token_ids, logprobs = self._sample(logits, [batch.seqs[i] for i in sample_idx])
        for seq in sampled:
            seq.num_pending_tokens += 1
        return _Step(batch, sampled, HostTokens(token_ids) if sampled else None, logprobs)

    def _advance(self, batch: ScheduledBatch) -> None:
        """The batch's KV is computed (or queued): count it, publish full pages, pin finished chunk prefills."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.is_finished:  # ended by its previous token, processed after this step was launched
                continue
            seq.num_computed_tokens += n
            self.scheduler.commit(seq)
            if seq.prefill_only and seq.num_computed_tokens == seq.num_tokens:
                self._pin(seq)

    def _process(self, step: _Step) -> None:
        """Appends a step's sampled tokens (waiting for them to reach the host)."""
        if step.tokens is None:
            return
        for seq in step.sampled:  # first, so that no failure below leaves a token counted as on its way
            seq.num_pending_tokens -= 1
        for seq, token, lp in zip(step.sampled, step.tokens.get(), step.logprobs):
            if seq.is_finished:  # aborted, failed, or ended by the token before
                continue
            try:
                self._append(seq, token, lp)
            except Exception as e:  # this request's postprocessing (detokenizer, grammar) broke: it alone ends
                log.exception("request %s failed", seq.request_id)
                try:
                    self.fail(seq, e)
                except Exception:  # its sink cannot take the news either; the others still get their tokens
                    log.exception("could not end request %s", seq.request_id)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[Sequence], torch.Tensor, list]:
        """(the sequences sampled, their token ids [n] on the device, their logprobs). logits: [len(seqs), vocab].
        When the batch fails, each row is sampled again alone, so only the requests whose own sampling breaks
        (penalties, grammar, sampler) end."""
        if not seqs:
            return [], logits.new_empty(0, dtype=torch.int64), []
        raw = logits
        if any(s.params.penalized or s.matcher is not None for s in seqs):
            # Penalties and grammar masks write into the logits, and in float32 (bf16 would round a penalised logit):
            # they get a float32 copy, raw keeps the model's for a retry.
            raw = logits.float()
            logits = raw.clone()
        try:
            out = self._sample_rows(logits, seqs)
            return seqs, out.token_ids, out.logprobs
        except Exception:
            log.exception("sampling a batch of %d failed; sampling its rows one at a time", len(seqs))
        sampled, token_ids, logprobs = [], [], []
        for i, seq in enumerate(seqs):
            try:
                out = self._sample_rows(raw[i : i + 1], [seq])
            except Exception as e:
                log.exception("request %s failed", seq.request_id)
                self.fail(seq, e)
                continue
            sampled.append(seq)
            token_ids.append(out.token_ids)
            logprobs += out.logprobs
        return sampled, torch.cat(token_ids) if token_ids else logits.new_empty(0, dtype=torch.int64), logprobs

    def _sample_rows(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        apply_penalties(logits, [s.params for s in seqs], [s.token_ids for s in seqs],
                        [s.num_prompt_tokens for s in seqs])
        apply_token_masks(logits, [s.matcher for s in seqs])
        return self.sampler(logits, [s.params for s in seqs], [s.generator for s in seqs])

    def _compose(self, seq: Sequence) -> None:
        """Copies a composed prompt's chunk KV into its freshly reserved pages (fails it if a chunk is gone)."""
        gone = [chunk.id for _, chunk in seq.compose if chunk.released]
        if gone:
            self.fail(seq, InvalidRequestError(f"chunks {gone} were released before the request ran"))
            return
        self.runner.copy_composed(seq)

    def _pin(self, seq: Sequence) -> None:
        """A chunk's prefill is done: pin its full pages (a root chain in the prefix cache) and end the request.
        A private (independent) chunk keeps all its pages, the partial last one too, outside the cache."""
        pages = seq.page_table if seq.private else seq.page_table[: seq.num_committed_pages]
        total = self.pages.num_pinned + self.pages.num_new_pins(pages)
        if total > self.max_pinned_pages:
            self.fail(seq, OutOfPagesError(
                f"cannot pin {len(pages)} more KV pages: chunks already pin {self.pages.num_pinned} and may pin at "
                f"most {self.max_pinned_pages} of the pool's {self.pages.num_pages} (max_pinned_fraction="
                f"{self.config.max_pinned_fraction}); release chunks first"))
            return
        if seq.private:
            self.pages.adopt_as_pins(pages)
            seq.page_table = []  # the references now belong to the chunk
        else:
            self.pages.pin(pages)
        seq.pinned_pages = list(pages)
        self._finish(seq, "stop", "")

    def _append(self, seq: Sequence, token: int, logprobs: Any) -> None:
        seq.token_ids.append(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        params, det = seq.params, seq.detokenizer
        # A grammar that has reached its end only allows stop tokens, so a terminated matcher ends the request.
        grammar_done = seq.matcher is not None and (not seq.matcher.accept_token(token) or seq.matcher.is_terminated())
        if grammar_done or token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            reason, delta = "stop", det.flush()  # the stop token itself is never part of the text
        else:
            delta, stopped = det.add(token)
            reason = "stop" if stopped else None
            if reason is None and (seq.num_output_tokens >= seq.max_tokens or len(seq.token_ids) >= self.max_model_len):
                reason, delta = "length", delta + det.flush()
        if reason is None:
            self._emit(seq, delta, [token], logprobs)
        else:
            self._finish(seq, reason, delta, [token], logprobs)

    def _finish(self, seq: Sequence, reason: str, delta: str, token_ids: list[int] | None = None,
                logprobs: Any = None, error: BaseException | None = None) -> None:
        self.scheduler.finish(seq, reason)
        self.requests.pop(seq.request_id, None)
        self._emit(seq, delta, token_ids or [], logprobs, reason, error)

    def _emit(self, seq: Sequence, delta: str, token_ids: list[int], logprobs: Any,
              reason: str | None = None, error: BaseException | None = None) -> None:
        if seq.sink is None:
            return
        usage = None
        if reason is not None:
            usage = Usage(seq.num_prompt_tokens, seq.num_cached_prompt_tokens or 0, seq.num_output_tokens)
        seq.sink(CompletionChunk(seq.request_id, delta, token_ids, reason, usage,
                                 [logprobs] if logprobs is not None else [], error))

    def fail(self, seq: Sequence, error: BaseException) -> None:
        """Ends one request with an error (a BraidError as is, anything else wrapped) and frees its pages."""
        if seq.is_finished:
            return
        wrapped = error if isinstance(error, BraidError) else RequestFailedError(
            f"request {seq.request_id} failed inside the engine: {type(error).__name__}: {error}")
        if wrapped is not error:
            wrapped.__cause__ = error
        self._finish(seq, "error", "", error=wrapped)

    # --- sizing -----------------------------------------------------------------------------------------------
    def _eos_token_ids(self) -> frozenset[int]:
        ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    def page_bytes(self) -> int:
        c = self.model_config
        elem = torch.empty((), dtype=self.dtype).element_size()
        return c.num_hidden_layers * 2 * c.num_key_value_heads * self.config.page_size * c.head_dim * elem

    def _num_pages_that_fit(self) -> int:
        if self.device.type != "cuda":
            return max(1, self.config.cpu_kv_cache_bytes // self.page_bytes())
        free, total = torch.cuda.mem_get_info(self.device)
        c, elem = self.model_config, torch.empty((), dtype=self.dtype).element_size()
        # Activations of the largest step (a few hidden/intermediate-wide buffers per token) and its logits.
        activations = self.config.max_num_batched_tokens * (8 * c.hidden_size + 4 * c.intermediate_size) * elem
        activations += self.config.max_num_seqs * c.vocab_size * 4 * 3
        budget = total * self.config.gpu_memory_utilization - (total - free) - activations
        return max(1, int(budget // self.page_bytes()))


@dataclass
class _Step:
    """A launched step: its batch, the sequences that sampled (row order) and their tokens on the way to the host."""

    batch: ScheduledBatch
    sampled: list[Sequence]
    tokens: HostTokens | None
    logprobs: list

    @property
    def deferrable(self) -> bool:
        """Whether the next step may be launched before these tokens are on the host: no sampled request needs its
        previous token there to sample the next (penalties, grammar) or asks for logprobs."""
        return all(s.params.logprobs is None and not s.params.penalized and s.matcher is None for s in self.sampled)

    def sampled_rows(self) -> dict[int, int]:
        """id(sequence) -> its row in `tokens`."""
        return {id(seq): i for i, seq in enumerate(self.sampled)}


def _pick_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidRequestError(f"device {device!r} was asked for but CUDA is not available")
    return torch.device(device)
