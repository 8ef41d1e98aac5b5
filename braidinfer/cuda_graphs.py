"""CUDA graphs: the model's forward for a decode-only step, captured once per batch-size bucket and replayed (plain and
cascade decode), and one sequence's short prefill, captured once per token-count bucket.

A decode step issues one kernel per operation (hundreds per step); for small batches launching them from Python costs
more than running them. A step of B sequences (one new token each) instead replays the graph of the smallest bucket
>= B, padded as braidinfer.graph_buckets describes (the host-side arithmetic lives there, torch-free). Which graph a
step replays, if any, is decided by braidinfer.step_plan.plan_step.

Everything a graph reads lives in static buffers: token ids and positions here, page tables and the split-KV schedule
in the attention's (FlashInferGraphDecode). Replay = copy the step into them, plan the attention (host side), replay,
read the hidden states of the first B rows.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from braidinfer.attention.cascade import CascadeStep, cascade_decoders, plan_cascade
from braidinfer.attention.flashinfer_backend import FlashInferAttention
from braidinfer.attention.metadata import AttentionMetadata
from braidinfer.graph_buckets import (
    MAX_GRAPH_BATCH_SIZE,
    PREFILL_GRAPH_TOKENS,
    PaddedDecode,
    bucket_for,
    graph_batch_sizes,
    pad_decode_batch,
    pad_inputs,
)
from braidinfer.models.forward_batch import ForwardBatch
from braidinfer.step_plan import DecodeGraphSizes, PrefillGraphSizes

__all__ = ["MAX_GRAPH_BATCH_SIZE", "PREFILL_GRAPH_TOKENS", "DecodeGraphs", "PrefillGraphs", "capture",
           "graph_batch_sizes"]

T = TypeVar("T")

_capture_lock = threading.Lock()
_capture_streams: dict[torch.device, torch.cuda.Stream] = {}


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream that every engine's CUDA-graph captures on `device` run on, one per process. PyTorch keeps a
    cuBLAS workspace (tens of MiB) for each stream that ran a cuBLAS call, until the process ends: with a new stream
    per capture, every engine built and closed would leave its workspaces behind. Hold `_capture_lock` while using
    it (engines built in two threads at once must not capture on one stream together)."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stream = _capture_streams.get(device)
    if stream is None:
        stream = _capture_streams[device] = torch.cuda.Stream(device)
    return stream


def capture(fn: Callable[[], T], pool=None, stream: torch.cuda.Stream | None = None
            ) -> tuple[torch.cuda.CUDAGraph, T]:
    """Runs `fn()` once eagerly on a side stream, so that whatever it creates lazily (rotary tables, FlashInfer's
    modules and cached buffers, cuBLAS workspaces, Triton's compiled kernels) exists before capture begins, then
    captures a second call into a CUDA graph on that stream. Returns the graph and what the captured call returned
    (static tensors: each replay rewrites them). `pool`: a graph memory pool (`torch.cuda.graph_pool_handle()`) to
    share with other graphs; `stream`: the side stream (default: the process's, `capture_stream`). The current
    stream waits for both runs. Capture runs in "thread_local" error mode, so CUDA work on other threads does not
    invalidate it."""
    stream = stream if stream is not None else capture_stream(torch.device("cuda"))
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            out = fn()
    torch.cuda.current_stream().wait_stream(stream)
    return graph, out


class _CapturedForwards:
    """The model's forward over static buffers of up to `max_rows` rows, for CUDA graphs to capture and replay: token
    ids, positions and KV slots in (one int64 buffer, so a step's inputs are one host-to-device copy), final hidden
    states out. Subclasses pick the row counts to capture and the attention of each. No kernel may write the
    positions or the slots: the QK-norm / RoPE kernel reads them before waiting for the kernel ahead
    (ForwardBatch.host_inputs); a kernel may fill in only token ids (`ready`)."""

    def __init__(self, model: torch.nn.Module, attention: FlashInferAttention, max_rows: int, hidden_size: int,
                 scratch_page: int):
        self.model = model
        self.page_size = attention.page_size
        self.scratch_page = scratch_page
        device = attention.kv_cache.device
        self.step_inputs = torch.zeros(3, max_rows, dtype=torch.int64, device=device)
        self.input_ids, self.positions, self.slot_mapping = self.step_inputs.unbind(0)
        self.hidden = torch.zeros(max_rows, hidden_size, dtype=attention.kv_cache.dtype, device=device)

    def _load_inputs(self, input_ids: list[int], positions: list[int], slot_mapping: list[int]) -> None:
        """Copies a step's (padded) token ids, positions and KV slots into the static buffers, in one copy."""
        inputs = torch.tensor([input_ids, positions, slot_mapping], dtype=torch.int64)
        self.step_inputs[:, : len(input_ids)].copy_(inputs, non_blocking=True)

    @contextlib.contextmanager
    def _capturing(self):
        """Yields (memory pool, side stream) for `_capture_one`. Capture largest first, all in one memory pool: a
        smaller graph reuses the larger ones' intermediate buffers; all on the process's capture stream (see
        `capture` and `capture_stream`)."""
        with _capture_lock:
            pool, stream = torch.cuda.graph_pool_handle(), capture_stream(self.hidden.device)
            with torch.inference_mode():
                yield pool, stream
            torch.cuda.synchronize()

    def _capture_one(self, num_rows: int, attention, pool, stream) -> torch.cuda.CUDAGraph:
        """The forward of the first num_rows rows through `attention` (planned for the loaded inputs), run once
        eagerly as a warm-up, then captured."""
        graph, _ = capture(lambda: self._forward(num_rows, attention), pool, stream)
        return graph

    def _forward(self, num_rows: int, attention) -> None:
        # The attention reads its page tables from its static buffers; the metadata gives the rows' KV slots (for
        # the fused kernel that writes them) and counts the rows.
        meta = AttentionMetadata([], self.slot_mapping[:num_rows], num_rows)
        batch = ForwardBatch(positions=self.positions[:num_rows], meta=meta, attention=attention,
                             host_inputs=True)  # positions and slots: _load_inputs' host copy
        self.hidden[:num_rows] = self.model(self.input_ids[:num_rows], batch)


class DecodeGraphs(_CapturedForwards):
    """The captured decode forwards of `model` over the FlashInfer backend's page pool, one per bucket, and with
    `cascade_min_saved_tokens` set a second graph per bucket of 2 or more rows whose attention is cascade decode
    (braidinfer.attention.cascade): plan_step has a step whose sequences share prefix pages replay that one when the
    sharing spares at least that many KV token reads per layer and KV head; otherwise the plain graph.

    scratch_page: a page of the pool outside the page manager's, which padding rows write and read.
    max_num_kv_indices: most page indices a step's page tables may hold; a step needing more runs eagerly.
    """

    def __init__(self, model: torch.nn.Module, attention: FlashInferAttention, batch_sizes: Sequence[int],
                 hidden_size: int, scratch_page: int, max_num_kv_indices: int,
                 cascade_min_saved_tokens: int | None = None):
        self.batch_sizes = sorted(batch_sizes)
        super().__init__(model, attention, self.batch_sizes[-1], hidden_size, scratch_page)
        self.max_num_kv_indices = max_num_kv_indices
        self.cascade_min_saved_tokens = cascade_min_saved_tokens
        self.attention = attention.graph_decoders(self.batch_sizes, max_num_kv_indices)
        cascade_sizes = [b for b in self.batch_sizes if b >= 2] if cascade_min_saved_tokens is not None else []
        self.cascade = cascade_decoders(attention, cascade_sizes, max_num_kv_indices) if cascade_sizes else {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.cascade_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.num_replays = 0
        """Decode steps run through a graph so far."""
        self.num_cascade_replays = 0
        """Of those, the steps that ran cascade decode."""
        self._capture()
        self.sizes = DecodeGraphSizes(
            tuple(self.batch_sizes), max_num_kv_indices, scratch_page, frozenset(self.cascade),
            frozenset(b for b, decoder in self.attention.items() if decoder.uses_triton_kernel))
        """What was captured, for braidinfer.step_plan.plan_step."""

    def run(self, input_ids: list[int], positions: list[int], page_tables: list[list[int]],
            ready: Callable[[torch.Tensor], None] | None = None, cascade: CascadeStep | None = None
            ) -> torch.Tensor | None:
        """Final hidden states [B, hidden] of a decode step of B sequences (see pad_decode_batch for the arguments),
        or None when it fits no graph (the caller runs it eagerly). With `cascade` (the step's split by
        plan_cascade for its bucket, as plan_step gives it) the bucket's cascade graph replays, else the plain one.
        `ready(token id buffer)` runs once the inputs are loaded and the attention planned, before the replay (to
        fill in token ids only the device has; it must write nothing else there). The result is a view of a static
        buffer that the next run overwrites."""
        batch_size = bucket_for(len(input_ids), self.batch_sizes)
        if batch_size is None:
            return None
        if cascade is not None:
            if batch_size not in self.cascade:
                raise ValueError(f"no cascade graph for a decode step of {len(input_ids)} sequences")
            self._load_inputs(*pad_inputs(input_ids, positions, page_tables, self.page_size, batch_size,
                                          self.scratch_page * self.page_size))
            self.cascade[batch_size].plan(cascade)
            graph = self.cascade_graphs[batch_size]
            self.num_cascade_replays += 1
        else:
            step = pad_decode_batch(input_ids, positions, page_tables, self.page_size, batch_size, self.scratch_page)
            if len(step.kv_indices) > self.max_num_kv_indices:
                return None
            self._load(step)
            graph = self.graphs[batch_size]
        if ready is not None:
            ready(self.input_ids[:batch_size])
        graph.replay()
        self.num_replays += 1
        return self.hidden[: len(input_ids)]

    def _capture(self) -> None:
        with self._capturing() as (pool, stream):
            for b in reversed(self.batch_sizes):
                self._load(pad_decode_batch([], [], [], self.page_size, b, self.scratch_page))  # all padding
                self.graphs[b] = self._capture_one(b, self.attention[b], pool, stream)
                if b in self.cascade:
                    self.cascade[b].plan(plan_cascade([], [], self.page_size, b, self.scratch_page, 0))
                    self.cascade_graphs[b] = self._capture_one(b, self.cascade[b], pool, stream)

    def _load(self, step: PaddedDecode) -> None:
        """Copies a step into the static buffers and plans its bucket's attention (never inside a capture)."""
        b = step.batch_size
        self._load_inputs(step.input_ids, step.positions, step.slot_mapping)
        self.attention[b].plan(step.kv_indptr, step.kv_indices, step.kv_last_page_len, positions=self.positions[:b])


class PrefillGraphs(_CapturedForwards):
    """The captured forwards of one sequence's prefill of up to max(PREFILL_GRAPH_TOKENS) new tokens, one per
    token-count bucket: the question after a cached prefix or pinned chunk, a new chat turn, a short prompt. Such a
    step computes little, so run eagerly its cost is the launch of every kernel from Python; replayed, it is the GPU
    work. Rows past the sequence's tokens are padding: token 0 at position 0, KV slot -1 (nothing written), attending
    to the scratch page (see FlashInferGraphPrefill).
    """

    def __init__(self, model: torch.nn.Module, attention: FlashInferAttention, hidden_size: int, scratch_page: int,
                 max_num_pages: int, token_counts: Sequence[int] = PREFILL_GRAPH_TOKENS):
        self.token_counts = sorted(token_counts)
        super().__init__(model, attention, self.token_counts[-1], hidden_size, scratch_page)
        self.attention = attention.graph_prefills(self.token_counts, max_num_pages)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.num_replays = 0
        """Prefill steps run through a graph so far."""
        self._capture()
        self.sizes = PrefillGraphSizes(tuple(self.token_counts))
        """What was captured, for braidinfer.step_plan.plan_step."""

    def run(self, input_ids: list[int], positions: list[int], page_table: list[int],
            ready: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor | None:
        """Final hidden states [T, hidden] of one sequence's T new tokens at `positions` (consecutive, ending its
        KV), its KV in `page_table`; or None when T fits no bucket. `ready`: as for DecodeGraphs.run. A view of a
        static buffer."""
        num_rows = bucket_for(len(input_ids), self.token_counts)
        if num_rows is None:
            return None
        self._load_inputs(*pad_inputs(input_ids, positions, [page_table] * len(positions), self.page_size, num_rows,
                                      pad_slot=-1))
        self.attention[num_rows].plan(len(input_ids), page_table, positions[-1] + 1, self.scratch_page)
        if ready is not None:
            ready(self.input_ids[:num_rows])
        self.graphs[num_rows].replay()
        self.num_replays += 1
        return self.hidden[: len(input_ids)]

    def _capture(self) -> None:
        with self._capturing() as (pool, stream):
            for n in reversed(self.token_counts):
                self._load_inputs(*pad_inputs([], [], [], self.page_size, n, pad_slot=-1))  # all padding
                self.attention[n].plan(0, [self.scratch_page], 1, self.scratch_page)
                self.graphs[n] = self._capture_one(n, self.attention[n], pool, stream)
