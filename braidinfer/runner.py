"""Turns a scheduled batch into tensors, runs the model over it and returns the logits to sample from."""
from __future__ import annotations

import logging
import math
import mmap
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from braidinfer.attention import AttentionMetadata, SeqSpan, TorchAttention
from braidinfer.attention.flashinfer_backend import FlashInferAttention, cache_head_dim, unsupported_reason
from braidinfer.attention.metadata import AttentionBackend
from braidinfer.cpu_graphs import CpuGraphs, decoder_layers
from braidinfer.cuda_graphs import DecodeGraphs, PrefillGraphs
from braidinfer.errors import InvalidRequestError
from braidinfer.graph_buckets import graph_batch_sizes
from braidinfer.layers.attention import pad_heads
from braidinfer.models.config import ModelConfig
from braidinfer.models.forward_batch import ForwardBatch
from braidinfer.scheduler import ScheduledBatch
from braidinfer.step_plan import Capabilities, PathConfig, StepFacts, StepPath, plan_step

log = logging.getLogger(__name__)


def _zeroed_pool(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros(shape): on the CPU in private anonymous memory (mmap), which the OS hands out zeroed and commits
    page by page as it is first written. torch.zeros writes every byte, so the CPU pool's whole size (1 GiB by
    default: cpu_kv_cache_bytes) was resident from the start, where a chat writes a few MiB of it."""
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes == 0 or not hasattr(mmap, "MAP_PRIVATE"):  # Windows' mmap has no flags
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), dtype=dtype).view(shape)


class ModelRunner:
    """Owns the model and the KV page pool [layers, pages, 2, kv_heads, page_size, head_dim] on one device.

    On the CPU with Braid's C kernels (KernelPlan.cpu) and enforce_eager False, decode steps replay each decoder
    layer's recorded kernel calls instead (`cpu_graphs`, braidinfer.cpu_graphs).

    With CUDA graphs (enforce_eager=False on the FlashInfer backend) the pool has one page more than the page manager
    hands out, the scratch page that padded graph rows write and read; decode-only steps of up to max_num_seqs
    sequences replay a captured graph, and so do steps that prefill up to 256 tokens of one sequence (PrefillGraphs);
    every other step runs eagerly. `cascade_min_saved_tokens` (None: off) adds cascade-decode graphs for steps whose
    sequences share prefix pages (see DecodeGraphs). Each step's path is chosen by braidinfer.step_plan.plan_step;
    `last_path` records the latest.
    """

    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, num_pages: int, page_size: int,
                 device: torch.device, dtype: torch.dtype, attention_backend: str = "torch",
                 enforce_eager: bool = True, max_num_seqs: int = 64, cascade_min_saved_tokens: int | None = None,
                 logits_context: Callable[[], AbstractContextManager] = nullcontext,
                 kv_dtype: torch.dtype | None = None):
        self.model = model
        self.logits_context = logits_context  # entered around compute_logits (StepThreads.wide on the CPU)
        self.device = device
        self.page_size = page_size
        backend, problem = attention_backend_name(attention_backend, device, dtype, cfg.head_dim)
        use_graphs = backend == "flashinfer" and not enforce_eager
        if not enforce_eager and not use_graphs and device.type == "cuda":
            log.info("CUDA graphs need the FlashInfer attention backend; running eagerly on the torch backend")
        num_pool_pages = num_pages + 1 if use_graphs else num_pages  # page num_pages: the graphs' scratch page
        self.head_dim = cfg.head_dim
        kv_head_dim = cache_head_dim(cfg.head_dim) if backend == "flashinfer" else cfg.head_dim
        if kv_dtype not in (None, dtype) and device.type != "cpu":
            # the engine refuses this first (engine.kv_cache_dtype): nothing on CUDA reads a pool of another dtype
            raise ValueError(f"a KV pool of {kv_dtype} under a {dtype} model needs the CPU")
        self.kv_cache = _zeroed_pool(
            (cfg.num_hidden_layers, num_pool_pages, 2, cfg.num_key_value_heads, page_size, kv_head_dim),
            kv_dtype or dtype, device)
        pad_heads(model, kv_head_dim)
        specs = model.attention_specs()
        self.attention: AttentionBackend = (
            FlashInferAttention(self.kv_cache, specs, cfg.num_attention_heads) if backend == "flashinfer"
            else TorchAttention(self.kv_cache, specs))
        self.fallbacks: list[str] = []
        """The faster paths this model cannot take and why (reported by the engine's kernel_paths)."""
        if problem is not None and device.type == "cuda":
            self.fallbacks.append(f"attention backend torch, not flashinfer (so no CUDA graphs): {problem}")
        if kv_head_dim != cfg.head_dim:
            self.fallbacks.append(
                f"FlashInfer has no kernels for head_dim {cfg.head_dim}: the KV cache holds heads zero-padded to "
                f"{kv_head_dim} ({kv_head_dim / cfg.head_dim:.2f}x the KV memory), and the fused QK-norm + RoPE + "
                f"KV-write kernel is off")
        plain_reason = getattr(self.attention, "plain_reason", None)
        if plain_reason is not None and use_graphs:
            self.fallbacks.append(f"CUDA-graph decode attends with FlashInfer, not the Triton decode kernel: "
                                  f"{plain_reason}")
            if cascade_min_saved_tokens is not None:
                self.fallbacks.append(f"cascade decode is off: {plain_reason}")
                cascade_min_saved_tokens = None
        for line in self.fallbacks:
            log.info(line)
        self._path_config = PathConfig(backend, page_size, cascade_min_saved_tokens if use_graphs else None)
        self.last_path: StepPath | None = None
        """How the latest step ran, and why (see braidinfer.step_plan)."""
        # FlashInfer's plan() stages its schedule in pinned host memory and copies it to the device asynchronously,
        # so a step must not be planned before the GPU has taken the previous step's copy: with asynchronous
        # scheduling the host runs a step ahead. Each step records this event once its inputs are loaded and its
        # attention planned (just before its forward); the next step waits on it before planning.
        self._planned: torch.cuda.Event | None = None
        self.graphs = (self._capture_graphs(cfg, num_pages, max_num_seqs, cascade_min_saved_tokens) if use_graphs
                       else None)
        self.prefill_graphs = (PrefillGraphs(self.model, self.attention, cfg.hidden_size, scratch_page=num_pages,
                                             max_num_pages=self._max_pages_per_seq(cfg, num_pages))
                               if use_graphs else None)
        if use_graphs:
            self._warm_logits(cfg.hidden_size, dtype)
        self.cpu_graphs = None
        """On the C kernel plan (KernelPlan.cpu) unless enforce_eager: decode steps replay each decoder layer's
        recorded kernel calls (braidinfer.cpu_graphs)."""
        layers = decoder_layers(model)
        if device.type == "cpu" and not enforce_eager and layers is not None and any(
                getattr(getattr(m, "plan", None), "cpu", False) for m in model.modules()):
            persistent = [*model.parameters(), *model.buffers(), self.kv_cache]
            self.cpu_graphs = CpuGraphs(layers, persistent)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, pending_tokens: torch.Tensor | None = None,
            pending_rows: list[int | None] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Computes the batch's new tokens. Returns logits [N, vocab] in the model's dtype for the N sequences whose
        every token now has KV (they sample next; prefill-only sequences never do), and their indices in the batch.

        A sequence whose last token is still on the device (sampled by the step in flight, see Sequence) reads it
        from pending_tokens[pending_rows[i]], i its index in the batch."""
        if self._planned is not None:
            self._planned.synchronize()
            self._planned = None
        input_ids, positions, sample_rows, sample_idx = [], [], [], []
        device_rows, source_rows = [], []  # input rows whose token is read from pending_tokens, and from which row
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            known = seq.token_ids[start:end]
            input_ids.extend(known)
            if len(known) < n:
                if len(known) != n - 1 or pending_rows is None or pending_rows[i] is None:
                    raise RuntimeError(f"request {seq.request_id}: token {len(seq.token_ids)} is neither on the host "
                                       "nor pending on the device")
                device_rows.append(len(input_ids))
                source_rows.append(pending_rows[i])
                input_ids.append(0)  # replaced on the device
            positions.extend(range(start, end))
            if end == seq.num_tokens and not seq.prefill_only:
                sample_rows.append(len(input_ids) - 1)
                sample_idx.append(i)
        patch = _RowCopy(device_rows, pending_tokens, source_rows) if device_rows else None
        try:
            hidden = self._hidden(batch, input_ids, positions, lambda ids: self._ready(ids, patch))
        except BaseException:
            self._ready(None, None)  # whatever it planned before failing must reach the device first
            raise
        if not sample_rows:
            return hidden.new_empty(0, 0, dtype=torch.float32), []
        if len(sample_rows) < len(input_ids):  # (a decode-only step samples every row: no gather)
            hidden = hidden[self._tensor(sample_rows)]
        with self.logits_context():
            return self.model.compute_logits(hidden), sample_idx

    def _hidden(self, batch: ScheduledBatch, input_ids: list[int], positions: list[int],
                ready: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """Final hidden states [T, hidden], along the path plan_step picks: a captured graph where one fits the step,
        else eagerly. Each path calls `ready(input ids on the device)` once the inputs are loaded and the attention
        planned."""
        page_tables = [seq.page_table for seq in batch.seqs]
        path = self.last_path = self.path_for(batch, page_tables)
        hidden = None
        if path.kind in ("decode_graph", "cascade_graph"):
            hidden = self.graphs.run(input_ids, positions, page_tables, ready, cascade=path.cascade)
        elif path.kind == "prefill_graph":
            hidden = self.prefill_graphs.run(input_ids, positions, page_tables[0], ready)
        return hidden if hidden is not None else self._forward(batch, input_ids, positions, ready)

    def path_for(self, batch: ScheduledBatch, page_tables: list[list[int]] | None = None) -> StepPath:
        """The path `run` takes for this batch (eager, decode graph, cascade graph or prefill graph) and why."""
        facts = StepFacts(batch.num_new_tokens,
                          [seq.num_computed_tokens + n for seq, n in zip(batch.seqs, batch.num_new_tokens)],
                          page_tables if page_tables is not None else [seq.page_table for seq in batch.seqs])
        capabilities = Capabilities(self.graphs.sizes if self.graphs is not None else None,
                                    self.prefill_graphs.sizes if self.prefill_graphs is not None else None)
        return plan_step(facts, self._path_config, capabilities)

    def _ready(self, input_ids: torch.Tensor | None, patch: _RowCopy | None) -> None:
        """The step's inputs are on the device and its attention planned: fill in the tokens only the device has,
        and mark the point the next step's plan must wait for."""
        if patch is not None:
            patch(input_ids)
        if self.device.type == "cuda":
            self._planned = torch.cuda.Event()
            self._planned.record()

    def _capture_graphs(self, cfg: ModelConfig, num_pages: int, max_num_seqs: int,
                        cascade_min_saved_tokens: int | None) -> DecodeGraphs:
        sizes = graph_batch_sizes(max_num_seqs)
        return DecodeGraphs(self.model, self.attention, sizes, cfg.hidden_size, scratch_page=num_pages,
                            max_num_kv_indices=sizes[-1] * self._max_pages_per_seq(cfg, num_pages),
                            cascade_min_saved_tokens=cascade_min_saved_tokens)

    @torch.inference_mode()
    def _warm_logits(self, hidden_size: int, dtype: torch.dtype) -> None:
        """Computes logits once at every decode bucket's row count and at one row fewer, so that the kernels that
        the logits' projection picks by row count (quantised weights: a GEMV, GEMM tilings, each specialised on
        rows divisible by 16 or not, or dequantise + matmul) compile while the engine loads. The graphs' capture
        compiled the layers' kernels; the logits run eagerly, and a kernel compiling there stalls the step that
        first needs it (seconds, in the middle of serving)."""
        for num_rows in sorted({n for b in self.graphs.batch_sizes for n in (b - 1, b) if n > 0}):
            with self.logits_context():
                self.model.compute_logits(torch.zeros(num_rows, hidden_size, dtype=dtype, device=self.device))

    def _max_pages_per_seq(self, cfg: ModelConfig, num_pages: int) -> int:
        return min(num_pages, -(-cfg.max_position_embeddings // self.page_size))  # the context fits both

    def _forward(self, batch: ScheduledBatch, input_ids: list[int], positions: list[int],
                 ready: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """The eager forward: final hidden states [T, hidden] of the batch's new tokens."""
        slots, spans, ps = [], [], self.page_size
        for seq, n, table in zip(batch.seqs, batch.num_new_tokens, self._page_tables(batch)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            q_start = len(slots)  # one slot per new token, in row order
            slots.extend(seq.page_table[p // ps] * ps + p % ps for p in range(start, end))
            spans.append(SeqSpan(q_start, n, end, table, generated=start >= seq.num_prompt_tokens))
        meta = AttentionMetadata(spans, self._tensor(slots), len(input_ids))
        self.attention.plan(meta)
        fb = ForwardBatch(positions=self._tensor(positions), meta=meta, attention=self.attention)
        ids = self._tensor(input_ids)
        ready(ids)
        return self.model(ids, fb)

    @torch.inference_mode()
    def copy_composed(self, page_table: list[int], segments: list[tuple[int, tuple[int, ...], int]]) -> None:
        """Copies the KV of a composed prompt's independent chunks into its pages (`page_table`). segments: (position
        in the prompt, the chunk's pages, its token count) each; a chunk was computed at positions 0.. on its own:
        its keys are rotated to its position, values copied."""
        ps, hd = self.page_size, self.head_dim
        k_pool = self.kv_cache.select(2, 0).permute(1, 3, 0, 2, 4)  # [pages, page_size, layers, kv_heads, head_dim]
        v_pool = self.kv_cache.select(2, 1).permute(1, 3, 0, 2, 4)
        table = self._tensor(page_table)
        for position, pages, num_tokens in segments:
            src = torch.arange(num_tokens, device=self.device)
            src_pages, src_off = self._tensor(list(pages))[src // ps], src % ps
            dst = src + position
            dst_pages, dst_off = table[dst // ps], dst % ps
            k = k_pool[src_pages, src_off]  # a copy; only its first head_dim dims when the pool's heads are padded
            if position:
                k[..., :hd] = self.model.shift_keys(k[..., :hd], position)
            k_pool[dst_pages, dst_off] = k
            v_pool[dst_pages, dst_off] = v_pool[src_pages, src_off]

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64).to(self.device, non_blocking=True)

    def _page_tables(self, batch: ScheduledBatch) -> list[torch.Tensor]:
        # One host-to-device copy for all page tables, then views per sequence.
        flat = self._tensor([p for seq in batch.seqs for p in seq.page_table])
        return list(flat.split([len(seq.page_table) for seq in batch.seqs]))


class _RowCopy:
    """dst[rows] = src[source_rows] on the device: a step's input tokens that the step before sampled."""

    def __init__(self, rows: list[int], src: torch.Tensor, source_rows: list[int]):
        self.rows, self.src, self.source_rows = rows, src, source_rows

    def __call__(self, dst: torch.Tensor) -> None:
        n = len(self.rows)
        if self.rows == self.source_rows == list(range(n)):  # a decode batch in the previous step's order
            dst[:n].copy_(self.src[:n])
            return
        index = torch.tensor([self.rows, self.source_rows], dtype=torch.int64).to(dst.device, non_blocking=True)
        dst[index[0]] = self.src[index[1]]


def attention_backend_name(name: str, device: torch.device, dtype: torch.dtype,
                           head_dim: int) -> tuple[str, str | None]:
    """The attention backend that `name` ("auto", "torch" or "flashinfer") resolves to ("torch" or "flashinfer"),
    and why "auto" could not take FlashInfer (None when it did, or when "torch" was asked for)."""
    problem = unsupported_reason(device, dtype, head_dim) if name != "torch" else None
    if name == "torch" or (name == "auto" and problem):
        return "torch", problem
    if problem:
        raise InvalidRequestError(f"attention_backend 'flashinfer' cannot run: {problem}")
    return "flashinfer", None
