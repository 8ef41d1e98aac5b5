"""The single-threaded engine core: schedule -> launch (forward and sampling) -> postprocess, step after step.
With asynchronous scheduling a step's postprocessing runs once the next step is queued on the device.

Not thread-safe, except `requests` (the `RequestBuilder`, safe from any thread): `LLM` owns one engine in one loop
thread (`EngineLoop`) and feeds it the sequences that callers built.
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import torch

from braidinfer import heap
from braidinfer.config import EngineConfig
from braidinfer.errors import InvalidRequestError, OutOfPagesError, PinWouldStarveError
from braidinfer.kv.page_manager import PageManager
from braidinfer.kv.pins import Pins
from braidinfer.layers import KernelPlan, cpu_int4, describe_kernels, select_kernels
from braidinfer.loader import resolve_model
from braidinfer.memory import num_kv_pages
from braidinfer.models import ModelConfig, model_class
from braidinfer.postprocess import OutputProcessor
from braidinfer.requests import RequestBuilder, RequestLimits
from braidinfer.runner import ModelRunner, attention_backend_name
from braidinfer.sampling.guided import GrammarCompiler
from braidinfer.sampling.logits import sample_batch
from braidinfer.sampling.sampler import HostTokens, Sampler, make_generator
from braidinfer.scheduler import ScheduledBatch, Scheduler
from braidinfer.sequence import Sequence
from braidinfer.step_threads import StepThreads
from braidinfer.weight_report import load_summary, weight_bytes
from braidinfer.weights import load_model

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LLMEngine:
    """One model loaded on one device with its KV page pool, scheduler, runner and sampler; `LLM` drives it from its
    engine thread. Read-only views for users: `kernel_paths`, `load_summary`, `memory_stats()`, `max_model_len`."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.source = resolve_model(config.model)
        self.model_config = ModelConfig.from_hf_config(self.source.hf_config, self.source.generation_config)
        cls = model_class(self.model_config)
        self.device = pick_device(config.device)
        self.dtype = pick_dtype(config.dtype, self.device)
        # refuse an explicit backend that cannot run before the weights load, not after (the runner resolves it)
        attention_backend_name(config.attention_backend, self.device, self.dtype, self.model_config.head_dim)
        self.tokenizer = self.source.load_tokenizer()
        form = "blocks" if self.device.type == "cuda" else cpu_weight_form(config, self.dtype)
        self.model = load_model(cls, self.model_config, self.source, self.device, self.dtype, config.progress,
                                quantized=config.weight_format == "auto", form=form)
        kinds = {kind for m in self.model.modules() for kind in getattr(m, "kinds", ())}
        if "int4" in kinds and config.cpu_decoded_prefill:
            for module in self.model.modules():
                if hasattr(module, "decoded_rows"):
                    module.decoded_rows = cpu_int4.DEQUANTIZE_ROWS
        elif config.cpu_decoded_prefill:
            log.warning("cpu_decoded_prefill=True changes only projections in torch's CPU int4 form, and this model "
                        "has none here (weight forms: %s); ignored", ", ".join(sorted(kinds)) or "float")
        self.kv_dtype = kv_cache_dtype(config.kv_cache_dtype, self.device, self.dtype, bool(kinds & {"int4", "dot"}))
        """The KV pool's dtype (EngineConfig.kv_cache_dtype resolved)."""
        self.load_summary = load_summary(self.model, self.source.quantized_names() if self.model.quantized_modules
                                         else {}, self.source.dequantized_names(), form)
        """Lines describing the loaded weights: bytes, tensors kept quantised, tensors dequantised and why."""
        self.source.release()  # the weights are in memory now: unmap the file
        for line in self.load_summary:
            log.info(line)
        self.kernel_plan = KernelPlan.choose(config.fused_kernels, config.gemv_decode, self.device, "dot" in kinds)
        select_kernels(self.model, self.kernel_plan)  # before the runner captures CUDA graphs
        max_model_len = min(config.max_model_len or 1 << 62, self.model_config.max_position_embeddings)
        if config.max_model_len and config.max_model_len > max_model_len:
            log.warning("max_model_len=%d exceeds the model's context of %d positions; serving %d",
                        config.max_model_len, max_model_len, max_model_len)
        if hasattr(self.model, "set_max_model_len"):  # e.g. LongRoPE picks its factor set by the served context
            self.model.set_max_model_len(max_model_len)
        eos_token_ids = self._eos_token_ids()
        num_pages = num_kv_pages(config, self.model_config, self.dtype, self.device, max_model_len, self.kv_dtype)
        self.pages = PageManager(num_pages, config.page_size, config.enable_prefix_caching)
        self.pins = Pins(self.pages, int(num_pages * config.max_pinned_fraction),
                         f" (max_pinned_fraction={config.max_pinned_fraction})")
        self.scheduler = Scheduler(self.pages, config.max_num_seqs, config.max_num_batched_tokens)
        self.step_threads = StepThreads(self.device, config.cpu_decode_threads)
        self.runner = ModelRunner(self.model, self.model_config, num_pages, config.page_size, self.device, self.dtype,
                                  config.attention_backend, config.enforce_eager, config.max_num_seqs,
                                  config.cascade_min_saved_tokens if config.cascade_decode else None,
                                  logits_context=self.step_threads.wide, kv_dtype=self.kv_dtype)
        self.sampler = Sampler()
        grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, sorted(eos_token_ids))
        limits = RequestLimits(self.model_config.vocab_size, max_model_len, num_pages, config.page_size,
                               self.pins.max_pages, getattr(self.model, "cannot_shift_keys", None))
        self.requests = RequestBuilder(config, self.tokenizer, limits, grammars, self.device,
                                       make_generator(config.seed, self.device))
        """Builds and validates requests (any thread)."""
        self.running: dict[str, Sequence] = {}
        """The requests the engine holds, by id (waiting or running)."""
        self.output = OutputProcessor(self.scheduler, self.running, eos_token_ids, max_model_len)
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.device.type == "cuda")
        self._in_flight: _Step | None = None  # a launched step whose tokens are not appended yet
        self._last_scheduled: list[Sequence] = []  # the sequences of the step launched last
        self.froze_heap = config.freeze_gc
        """Whether this engine froze the loaded heap (braidinfer.heap) until it closes."""
        if self.froze_heap:
            heap.freeze()

    @property
    def kernel_paths(self) -> list[str]:
        """Which path each kind of layer runs, one line each ("rmsnorm: torch", ...), then the attention backend, then
        each faster path this model falls back from, with the reason."""
        replay = [] if self.runner.cpu_graphs is None else [
            f"decode steps of up to {self.runner.cpu_graphs.max_rows} rows: each decoder layer's C kernel calls "
            f"recorded once and replayed (braidinfer.cpu_graphs; a layer that computes outside them runs eagerly)"]
        return (describe_kernels(self.model, self.runner.attention) + replay
                + [f"fallback: {f}" for f in self.runner.fallbacks])

    def memory_stats(self) -> dict[str, int]:
        """Bytes of the weights as held (each storage once; see `LLM.memory_stats`) and of the KV page pool."""
        kv = self.runner.kv_cache
        return {"weight_bytes": weight_bytes(self.model), "kv_bytes": kv.numel() * kv.element_size()}

    @property
    def max_model_len(self) -> int:
        """Longest prompt plus output, in tokens."""
        return self.requests.limits.max_model_len

    # --- requests (engine thread) ------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.running:
            raise InvalidRequestError(f"request id {seq.request_id!r} is already running")
        self.running[seq.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Ends a request now and frees its pages; unknown or finished ids are ignored."""
        seq = self.running.get(request_id)
        if seq is not None:
            self.output.finish(seq, "abort", "")

    def fail(self, seq: Sequence, error: BaseException) -> None:
        """Ends one request with an error and frees its pages."""
        self.output.fail(seq, error)

    def unpin(self, owner: str) -> None:
        """Drops the pin that `owner` (a chunk's id) holds, if any."""
        self.pins.unpin(owner)

    def close(self) -> None:
        """Frees the engine's device memory (weights, KV pool, CUDA graphs) for others in this process; the engine
        cannot run afterwards. Call once no thread steps it (LLM.close does, after its loop stopped)."""
        self.model = self.runner = None
        self.running.clear()
        self._in_flight = None
        self._last_scheduled = []
        with heap.thawed(release=self.froze_heap):
            self.froze_heap = False
            gc.collect()  # the graphs and the model hold reference cycles
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    def requests_of_failed_step(self) -> list[Sequence]:
        """The requests to fail after `step` raised: those the failing step ran that are still running. If it failed
        before it had a batch, the fault is nobody's in particular: the running requests, or with none every
        request, or the same fault could repeat on every step."""
        if self._last_scheduled:
            return [seq for seq in self._last_scheduled if not seq.is_finished]
        return list(self.scheduler.running) or list(self.running.values())

    # --- the step ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """Schedule -> launch the forward and sampling -> append the sampled tokens.

        With asynchronous scheduling a step whose sampled requests need nothing of their previous token on the host
        (no penalties, grammar or logprobs) is left in flight: its tokens are appended during the next step, once
        that step's work is queued behind it on the device (its rows read their input tokens there), so the host's
        work overlaps the GPU's. A request that ends on such a token has had one more token computed, dropped."""
        in_flight, self._in_flight = self._in_flight, None
        try:
            step = self._launch(self._schedule(), in_flight)
        finally:
            if in_flight is not None:
                self._postprocess(in_flight)
        if step is not None:
            self._advance(step.batch)
            if self.async_scheduling and step.deferrable:
                self._in_flight = step
            else:
                self._postprocess(step)

    def _schedule(self) -> ScheduledBatch:
        """The next batch; requests that can never fit fail, composed prompts get their chunks' KV copied in."""
        self._last_scheduled = []
        batch = self.scheduler.schedule()
        for seq, reason in self.scheduler.take_rejected():
            self.fail(seq, OutOfPagesError(reason))
        for seq in self.scheduler.take_composing():
            self._compose(seq)
        batch.drop_finished()
        self._last_scheduled = list(batch.seqs)
        return batch

    def _launch(self, batch: ScheduledBatch, in_flight: _Step | None) -> _Step | None:
        """Queues the batch's forward and sampling. Waits for the device only where it must: for the previous step's
        inputs before planning (see ModelRunner), and for logprobs that were asked for."""
        if not batch:
            return None
        pending = in_flight.sampled_rows() if in_flight is not None else {}
        rows = [pending.get(id(seq)) for seq in batch.seqs]
        with self.step_threads.for_step(batch.num_new_tokens):
            logits, sample_idx = self.runner.run(batch, in_flight.tokens.device_ids if pending else None, rows)
            sampled = sample_batch(self.sampler, logits, [batch.seqs[i] for i in sample_idx])
        for seq, error in sampled.failed:
            self.fail(seq, error)
        for seq in sampled.seqs:
            seq.num_pending_tokens += 1
        tokens = HostTokens(sampled.token_ids) if sampled.seqs else None
        return _Step(batch, sampled.seqs, tokens, sampled.logprobs)

    def _advance(self, batch: ScheduledBatch) -> None:
        """The batch's KV is computed (or queued): count it, publish full pages, pin finished chunk prefills.

        Pins come after every commit: a request that computed a chunk's prefix in the same step has its copy of those
        pages replaced by the chunk's (or the chunk's by its) when it commits, and only then are they seen shared."""
        prefilled = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.is_finished:  # ended by its previous token, processed after this step was launched
                continue
            seq.num_computed_tokens += n
            self.scheduler.commit(seq)
            if seq.prefill_only and seq.num_computed_tokens == seq.num_tokens:
                prefilled.append(seq)
        for seq in prefilled:
            self._pin(seq)

    def _postprocess(self, step: _Step) -> None:
        """Appends a step's sampled tokens (waiting for them to reach the host)."""
        if step.tokens is None:
            return
        for seq in step.sampled:  # first, so that no failure below leaves a token counted as on its way
            seq.num_pending_tokens -= 1
        self.output.process(step.sampled, step.tokens.get(), step.logprobs)

    def _compose(self, seq: Sequence) -> None:
        """Copies a composed prompt's chunk KV into its freshly reserved pages. At its first admission it takes a
        reference on the chunks' pages (fails if a chunk is gone), which it holds to its end; a failure to copy
        fails this request alone."""
        if seq.composed_pages is None:
            pages = [self.pins.get(segment.pin_owner) for segment in seq.compose]
            gone = [segment.pin_owner for segment, p in zip(seq.compose, pages) if p is None]
            if gone:
                self.fail(seq, InvalidRequestError(f"chunks {gone} were released before the request ran"))
                return
            for p in pages:
                self.pages.acquire(p)
            seq.composed_pages = pages
        try:
            self.runner.copy_composed(seq.page_table, [(segment.position, p, segment.num_tokens)
                                                       for segment, p in zip(seq.compose, seq.composed_pages)])
        except Exception as e:  # e.g. a device error
            log.exception("request %s failed", seq.request_id)
            self.fail(seq, e)

    def _pin(self, seq: Sequence) -> None:
        """A chunk's prefill is done: pin its full pages (a root chain in the prefix cache) and end the request.
        A private (independent) chunk keeps all its pages, the partial last one too, outside the cache."""
        pages = seq.page_table if seq.private else seq.page_table[: seq.num_committed_pages]
        # A full budget is the answer to give first (pins.pin raises it): releasing chunks makes room, which also
        # helps a started request.
        if self.pins.over_budget(pages) is None:
            problem = self.scheduler.starved_by_pin(pages)
            if problem:
                self.fail(seq, PinWouldStarveError(problem))
                return
        try:
            self.pins.pin(seq.pin_owner, pages, private=seq.private)
        except OutOfPagesError as e:
            self.fail(seq, e)
            return
        if seq.private:
            seq.page_table = []  # the references now belong to the pin
        seq.pinned_pages = list(pages)
        self.output.finish(seq, "stop", "")

    def _eos_token_ids(self) -> frozenset[int]:
        ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)


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


def cpu_weight_form(config: EngineConfig, dtype: torch.dtype) -> str:
    """The QuantLinear form of a CPU engine (EngineConfig.cpu_native_kernels and cpu_int4): "dot" (Braid's
    integer-dot kernels), "int4" (torch's int4 op) or "float" (decoded at load); raises InvalidRequestError where
    cpu_native_kernels=True cannot be had."""
    if config.cpu_int4 is False:
        if config.cpu_native_kernels:
            raise InvalidRequestError("cpu_native_kernels=True computes from the quantised weights, which "
                                      "cpu_int4=False decodes to float at load: set one of them otherwise")
        return "float"
    if config.cpu_native_kernels or (config.cpu_native_kernels is None and config.cpu_int4 is None):
        from braid_kernels import cpu_quant  # imported on use: braid_kernels reads TRITON_INTERPRET

        why = cpu_quant.unavailable_reason() or (
            None if dtype == torch.float32 else f"they compute in float32, the model's dtype is {dtype}")
        if why is None:
            return "dot"
        if config.cpu_native_kernels:
            raise InvalidRequestError(f"cpu_native_kernels=True, but Braid's CPU kernels cannot run here: {why}")
        log.debug("Braid's CPU kernels are not used: %s", why)
    return "int4" if (cpu_int4.fast_here() if config.cpu_int4 is None else config.cpu_int4) else "float"


def kv_cache_dtype(name: str, device: torch.device, dtype: torch.dtype, quantised: bool) -> torch.dtype:
    """The KV pool's dtype for EngineConfig.kv_cache_dtype `name` (see there) with the model in `dtype` on `device`,
    `quantised` when some projection runs in a CPU quantised form ("dot" or "int4"); raises InvalidRequestError for a
    dtype other than the model's on CUDA."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cpu" and quantised and dtype == torch.float32 else dtype
    kv = _DTYPES[name]
    if kv != dtype and device.type != "cpu":
        raise InvalidRequestError(f"kv_cache_dtype {name!r} differs from the model's dtype "
                                  f"({str(dtype).removeprefix('torch.')}), which needs device 'cpu'")
    return kv


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The model dtype of EngineConfig.dtype on `device`: "auto" is bfloat16 on CUDA and float32 on the CPU."""
    if dtype != "auto":
        return _DTYPES[dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def pick_device(device: str | None) -> torch.device:
    """The device of EngineConfig.device: CUDA when None and available, else the CPU; asking for CUDA without it is an
    InvalidRequestError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidRequestError(f"device {device!r} was asked for but CUDA is not available")
    picked = torch.device(device)
    if picked.type == "cuda" and picked.index is not None and picked.index >= (count := torch.cuda.device_count()):
        raise InvalidRequestError(f"device {device!r} was asked for but this machine has {count} CUDA device(s)")
    return picked
