"""Paged attention through FlashInfer on CUDA: one plan per step shared by every layer, then two kernels per layer
(append the new K/V to the page pool, attend through the page tables).

`FlashInferGraphDecode` is the same decode for a fixed batch size in a form that a CUDA graph can capture; up to
TRITON_DECODE_MAX_ROWS rows it attends with Braid's Triton kernel (kernels.decode_attention) instead of FlashInfer's.
FlashInfer is imported only when this backend is built, so the engine runs where it is not installed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from braidinfer.attention.metadata import AttentionMetadata, paged_kv_layout, paged_kv_tables
from braidinfer.attention.spec import AttentionSpec, distinct_specs, non_plain_reason, per_layer_specs
from braidinfer.attention.torch_backend import write_kv

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128, 256)
WORKSPACE_BYTES = 256 << 20  # split-KV partial results; FlashInfer recommends >= 128 MiB
TRITON_DECODE_MAX_ROWS = 8
"""CUDA-graph decodes of up to this many rows use kernels.decode_attention: one launch per layer with the split-KV
merge inside, where FlashInfer's decode runs two (decode, then merge states). On an H100 at 512 tokens of context it
takes 6.8 us a layer where FlashInfer takes 9.0 at batch 1 (Qwen3-0.6B heads), 5.6-6.8 vs 7.4-9.7 for SmolLM2's at
batch 1-8; at 4k-16k tokens it runs at 0.8x-1.1x FlashInfer's speed (benchmarks/decode_attention.py). Qwen3-0.6B's
graph replay at batch 1 and 512 tokens went from 1.054 to 0.961 ms."""
TRITON_DECODE_HEAD_DIMS = (64, 128)  # the head dims that benchmark and the GPU tests cover
INT_WORKSPACE_BYTES = 8 << 20  # what each FlashInfer wrapper allocates for its plan (the schedule its kernels read)


def unsupported_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the FlashInfer backend cannot run with these settings, or None when it can."""
    if device.type != "cuda":
        return f"it needs a CUDA device, the engine runs on {device}"
    if dtype not in SUPPORTED_DTYPES:
        return f"it needs float16 or bfloat16 weights and KV, got {str(dtype).removeprefix('torch.')}"
    if not min(SUPPORTED_HEAD_DIMS) <= head_dim <= max(SUPPORTED_HEAD_DIMS):
        return (f"it supports head_dim {min(SUPPORTED_HEAD_DIMS)} to {max(SUPPORTED_HEAD_DIMS)} (padded up to the next "
                f"of {SUPPORTED_HEAD_DIMS}), the model has {head_dim}")
    try:
        import flashinfer  # noqa: F401
    except Exception as e:  # ImportError, or a broken install failing on its CUDA libraries
        return f"flashinfer cannot be imported ({type(e).__name__}: {e}); install the `gpu` extra"
    return None


def cache_head_dim(head_dim: int) -> int:
    """The head width of the KV pool that FlashInfer serves a model of `head_dim` with: head_dim itself when
    FlashInfer has kernels for it, else the next width in SUPPORTED_HEAD_DIMS (Phi-3-mini's 96 -> 128). Head dims
    below the smallest (tiny test models) are not padded: padding them would double the KV or more, and
    `unsupported_reason` sends them to the torch backend.

    Padded heads are exact: the model writes K and V zero-padded (PagedAttention, see layers.attention.pad_heads),
    so the padding adds nothing to q.k whatever q holds there, and the attention output is zero there and dropped;
    the softmax scale comes from the layer's spec (head_dim ** -0.5 of the real width). It costs
    cache_head_dim / head_dim more KV memory and bandwidth (1.33x at 96)."""
    if head_dim < min(SUPPORTED_HEAD_DIMS):
        return head_dim
    return next((dim for dim in SUPPORTED_HEAD_DIMS if dim >= head_dim), head_dim)


DECODE_GROUP_SIZES = (1, 2, 3, 4, 8)
"""Query heads per KV head that FlashInfer's decode kernels are compiled for ("Unsupported group_size: 7" for
Qwen2.5-7B's 28 / 4); other group sizes decode through its tensor-core (prefill) kernel, which takes any."""


def decode_options(num_qo_heads: int, num_kv_heads: int) -> dict:
    """Keyword arguments for a BatchDecodeWithPagedKVCacheWrapper serving this head layout."""
    return {"use_tensor_cores": True} if num_qo_heads // num_kv_heads not in DECODE_GROUP_SIZES else {}


class PlanSlot:
    """An int workspace (where a FlashInfer wrapper's plan puts the schedule its kernels read) that the CUDA-graph
    wrappers of one role share across their batch sizes, e.g. the decode graphs' wrappers of one layer spec. Each
    wrapper would otherwise hold its own 8 MiB: 50 of them (400 MiB) at max_num_seqs=256. Only one graph replays at a
    time, and a wrapper plans before its replay; `owner` is the planner whose plan the slot holds, so that one that
    skips planning when its step has the same shape as before (FlashInferGraphDecode) knows whether it still may."""

    def __init__(self, float_workspace: torch.Tensor):
        self.float_workspace = float_workspace  # the backend's, which every wrapper shares
        self.buffer = torch.empty(INT_WORKSPACE_BYTES, dtype=torch.uint8, device=float_workspace.device)
        self.owner: object | None = None

    def wrapper(self, cls, *args, **kwargs):
        """A FlashInfer wrapper `cls(float workspace, *args, **kwargs)` whose plans go to this slot."""
        wrapper = cls(self.float_workspace, *args, **kwargs)
        wrapper.reset_workspace_buffer(self.float_workspace, self.buffer)
        return wrapper


class FlashInferAttention:
    """Same call as TorchAttention; `plan(meta)` runs once per step, before the forward, for all layers.

    kv_cache: [num_layers, num_pages, 2, num_kv_heads, page_size, head_dim] (HND), float16/bfloat16, on CUDA.
    Steps with any q_len > 1 (prefill, chunked prefill, prefill mixed with decodes) use the paged prefill kernel with
    a causal mask aligned to the end of each sequence's KV; decode-only steps use the paged decode kernel.

    specs: one AttentionSpec per layer (or one scale for plain attention everywhere). Layers with different specs
    (Gemma's sliding-window and global layers) get a wrapper each, all planned once per step with the spec's
    sm_scale, window_left and logits_soft_cap.
    """

    def __init__(self, kv_cache: torch.Tensor, specs: list[AttentionSpec] | float, num_qo_heads: int):
        import flashinfer

        self.kv_cache = kv_cache
        _, _, _, self.num_kv_heads, self.page_size, self.head_dim = kv_cache.shape
        self.num_qo_heads = num_qo_heads
        self.specs = per_layer_specs(specs, kv_cache.shape[0])
        self.distinct_specs = distinct_specs(self.specs)
        self.spec_index = [self.distinct_specs.index(s) for s in self.specs]  # layer -> its spec's wrapper
        # Shared by every wrapper (these and the CUDA-graph ones): one of them runs at a time, on one stream.
        # Zeroed, as the decode wrapper asks on first use.
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=kv_cache.device)
        self._prefill = [flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, kv_layout="HND")
                         for _ in self.distinct_specs]
        self.decode_options = decode_options(num_qo_heads, self.num_kv_heads)
        self._decode = [flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, kv_layout="HND",
                                                                      **self.decode_options)
                        for _ in self.distinct_specs]
        self._append_kv = flashinfer.append_paged_kv_cache
        self._planned: AttentionMetadata | None = None  # the step that plan() last prepared
        self._wrappers: list = []  # per distinct spec, the wrapper planned for the step
        self._plan_slots: dict[tuple, PlanSlot] = {}

    def plan_slot(self, *role) -> PlanSlot:
        """The int workspace that the CUDA-graph wrappers of `role` (e.g. "decode", spec index) share."""
        if role not in self._plan_slots:
            self._plan_slots[role] = PlanSlot(self.workspace)
        return self._plan_slots[role]

    @property
    def plain_reason(self) -> str | None:
        """Why the paths that compute only plain attention with one scale for every layer (Triton decode, cascade)
        cannot serve this model, or None when they can."""
        reason = non_plain_reason(self.specs)
        if reason is None and len(self.distinct_specs) > 1:
            reason = "the model's layers differ in their softmax scale"
        return reason

    @property
    def scale(self) -> float:
        """The softmax scale of every layer (the plain paths' one scale; see plain_reason)."""
        if self.plain_reason is not None:
            raise RuntimeError(f"no single plain attention scale: {self.plain_reason}")
        return self.specs[0].scale
        self._new_tokens: tuple[torch.Tensor, ...] = ()  # (batch_indices, positions) on the device
        self._pages: tuple[torch.Tensor, ...] = ()  # (kv_indices, kv_indptr, kv_last_page_len) on the device

    def plan(self, meta: AttentionMetadata) -> None:
        """Builds the step's page-table arrays (on the host, one copy to the device) and plans the kernel."""
        host, kv_indptr = _host_arrays(meta, self.page_size)
        flat = torch.cat(list(host.values())).to(self.kv_cache.device, non_blocking=True)
        dev = dict(zip(host, flat.split([t.numel() for t in host.values()])))
        num_pages = [end - start for start, end in zip(kv_indptr, kv_indptr[1:])]
        kv_indices = torch.cat([s.page_table[:n] for s, n in zip(meta.spans, num_pages)]).to(torch.int32)
        self._new_tokens = (dev["batch_indices"], dev["positions"])
        self._pages = (kv_indices, dev["kv_indptr"], dev["kv_last_page_len"])
        dtype, dims = self.kv_cache.dtype, (self.num_qo_heads, self.num_kv_heads, self.head_dim, self.page_size)
        # The wrappers take the small indptr arrays from the host (they need them there to plan) and the page
        # indices from the device.
        if meta.is_decode_only:
            for wrapper, spec in zip(self._decode, self.distinct_specs):
                wrapper.plan(host["kv_indptr"], kv_indices, host["kv_last_page_len"], *dims,
                             q_data_type=dtype, kv_data_type=dtype, **spec_kwargs(spec))
            self._wrappers = self._decode
        else:
            for wrapper, spec in zip(self._prefill, self.distinct_specs):
                wrapper.plan(host["qo_indptr"], host["kv_indptr"], kv_indices, host["kv_last_page_len"], *dims,
                             causal=True, q_data_type=dtype, kv_data_type=dtype, **spec_kwargs(spec))
            self._wrappers = self._prefill
        self._planned = meta

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata):
        """q: [T, num_qo_heads, head_dim]; k, v: [T, num_kv_heads, head_dim] -> out: [T, num_qo_heads, head_dim]."""
        if meta is not self._planned:
            raise RuntimeError("FlashInferAttention.plan(meta) must be called once per step before the forward")
        cache = self.kv_cache[layer]  # (pages, 2, kvh, ps, hd)
        if k.dtype != cache.dtype or v.dtype != cache.dtype:  # the kernel reinterprets k/v as the cache's dtype
            raise TypeError(f"k/v dtype {k.dtype}/{v.dtype} differs from the KV cache's {cache.dtype}")
        self._append_kv(k, v, *self._new_tokens, cache, *self._pages, kv_layout="HND")  # k, v may be strided views
        return self._wrappers[self.spec_index[layer]].run(q, cache)

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention only: the step's new K/V are already in the pool (written at meta.slot_mapping)."""
        if meta is not self._planned:
            raise RuntimeError("FlashInferAttention.plan(meta) must be called once per step before the forward")
        return self._wrappers[self.spec_index[layer]].run(q, self.kv_cache[layer])

    def graph_prefills(self, token_counts: list[int], max_num_pages: int) -> dict[int, FlashInferGraphPrefill]:
        """A CUDA-graph prefill attention for one sequence and each padded token count, over one set of static
        buffers. `max_num_pages`: most pages one sequence's KV may span."""
        buffers = _PrefillBuffers.allocate(max_num_pages + max(token_counts), self.kv_cache.device)
        return {n: FlashInferGraphPrefill(self, n, buffers) for n in token_counts}

    def graph_decoders(self, batch_sizes: list[int], max_num_kv_indices: int) -> dict[int, FlashInferGraphDecode]:
        """A CUDA-graph decode attention for each batch size, all over one set of static page-table buffers (only one
        graph replays at a time). `max_num_kv_indices`: most page indices one step's page tables may hold."""
        buffers = _GraphBuffers.allocate(max(batch_sizes), max_num_kv_indices, self.kv_cache.device)
        return {b: FlashInferGraphDecode(self, b, buffers) for b in batch_sizes}


@dataclass(frozen=True)
class _GraphBuffers:
    """Device arrays that captured decode steps read; `FlashInferGraphDecode.plan` refills them before each replay.

    The page-table arrays are views of one int32 buffer, [kv_indptr | kv_last_page_len | kv_indices], so a step's
    tables reach the device in one copy. No kernel may write them: Braid's Triton decode reads them before waiting
    for the kernel ahead of it (decode_attention's tables_ready)."""

    batch_indices: torch.Tensor  # [max_batch] int32: 0, 1, 2, ... (row b's new token belongs to sequence b)
    kv_positions: torch.Tensor  # [max_batch] int32: each row's new token's position in its sequence's KV
    tables: torch.Tensor  # [2 * max_batch + 1 + max_num_kv_indices] int32: the three views below
    kv_indptr: torch.Tensor  # [max_batch + 1] int32
    kv_last_page_len: torch.Tensor  # [max_batch] int32
    kv_indices: torch.Tensor  # [max_num_kv_indices] int32

    @classmethod
    def allocate(cls, max_batch: int, max_num_kv_indices: int, device: torch.device) -> _GraphBuffers:
        tables = torch.zeros(2 * max_batch + 1 + max_num_kv_indices, dtype=torch.int32, device=device)
        indptr, last_page_len, indices = tables.split([max_batch + 1, max_batch, max_num_kv_indices])
        return cls(torch.arange(max_batch, dtype=torch.int32, device=device),
                   torch.zeros(max_batch, dtype=torch.int32, device=device), tables, indptr, last_page_len, indices)


class FlashInferGraphDecode:
    """Decode attention for exactly `batch_size` sequences (one new token each) that a CUDA graph can capture.

    The attention reads the page tables from static buffers (views of `_GraphBuffers`) that `plan` (host side, never
    captured) rewrites before each replay, so the captured kernels see the new step. Up to TRITON_DECODE_MAX_ROWS
    rows that is Braid's Triton decode, whose grid is fixed and which cuts each row's KV into slices on the device:
    `plan` only copies the tables. Above, FlashInfer's CUDA-graph decode wrapper, which also keeps its split-KV
    schedule at fixed workspace offsets; the schedule depends only on the rows' page counts, so while those stay the
    same (a sequence fills a page over page_size steps) only the tables are copied, else `plan` re-plans it. The new
    K/V are appended through the same static buffers (or written by the model's fused kernel, then `attend`).
    Same call as FlashInferAttention; the metadata argument is not read.
    """

    def __init__(self, backend: FlashInferAttention, batch_size: int, buffers: _GraphBuffers):
        import flashinfer

        b = batch_size
        self.kv_cache = backend.kv_cache
        self.page_size = backend.page_size
        self.batch_size = b
        self._dims = (backend.num_qo_heads, backend.num_kv_heads, backend.head_dim, backend.page_size)
        self._specs, self._spec_index = backend.distinct_specs, backend.spec_index
        self._buffers = buffers
        indptr, last_page_len = buffers.kv_indptr[: b + 1], buffers.kv_last_page_len[:b]
        self._wrappers, self._triton = [], None  # one FlashInfer wrapper per distinct spec, or the Triton kernel
        self._slots: list[PlanSlot] = []  # the wrappers' int workspaces, shared with the other batch sizes
        if _triton_decode_fits(backend, b):
            self._triton = _TritonDecode(backend, b, buffers.kv_indices.numel())
        else:
            self._slots = [backend.plan_slot("decode", i) for i in range(len(self._specs))]
            self._wrappers = [slot.wrapper(
                flashinfer.BatchDecodeWithPagedKVCacheWrapper, kv_layout="HND", use_cuda_graph=True,
                paged_kv_indptr_buffer=indptr, paged_kv_indices_buffer=buffers.kv_indices,
                paged_kv_last_page_len_buffer=last_page_len, **backend.decode_options)
                for slot in self._slots]
        self._kv_positions = buffers.kv_positions[:b]
        self._positions: torch.Tensor | None = None  # the step's positions (plan's argument), copied by __call__
        self._copying_layer: int | None = None  # the first layer that calls __call__: it copies them, once a step
        self._new_tokens = (buffers.batch_indices[:b], self._kv_positions)
        self._pages = (buffers.kv_indices, indptr, last_page_len)  # the kernel reads indices through indptr
        self._append_kv = flashinfer.append_paged_kv_cache
        self._planned_indptr: list[int] | None = None  # the page counts the wrapper's schedule was planned for

    @property
    def uses_triton_kernel(self) -> bool:
        """Whether this batch size attends with kernels.decode_attention (else FlashInfer's decode)."""
        return self._triton is not None

    def plan(self, kv_indptr: list[int], kv_indices: list[int], kv_last_page_len: list[int],
             positions: torch.Tensor) -> None:
        """The next replay's page tables in FlashInfer's CSR form: kv_indptr [b + 1], kv_indices [kv_indptr[-1]],
        kv_last_page_len [b] in [1, page_size]. Row i's new token is the last of its KV, at positions[i] ([b], on
        the device; read by the replay, so a static buffer under CUDA graphs). Must run outside capture, before each
        replay (or the eager warm-up run)."""
        b, max_batch = self.batch_size, len(self._buffers.kv_last_page_len)
        self._positions = positions
        if self._triton is not None or (kv_indptr == self._planned_indptr
                                        and all(slot.owner is self for slot in self._slots)):
            # Same schedule: one copy of [indptr | last_page_len (at its offset) | indices] into the static tables.
            host = torch.zeros(2 * max_batch + 1 + len(kv_indices), dtype=torch.int32)
            host[: b + 1] = torch.tensor(kv_indptr, dtype=torch.int32)
            host[max_batch + 1 : max_batch + 1 + b] = torch.tensor(kv_last_page_len, dtype=torch.int32)
            host[2 * max_batch + 1 :] = torch.tensor(kv_indices, dtype=torch.int32)
            self._buffers.tables[: len(host)].copy_(host, non_blocking=True)
            return
        dtype = self.kv_cache.dtype
        # The wrapper copies indptr and last_page_len from the host (it plans on them there) and the indices on the
        # device; a host tensor there would be copied synchronously.
        indices = torch.tensor(kv_indices, dtype=torch.int32).to(self.kv_cache.device, non_blocking=True)
        indptr, last_page_len = (torch.tensor(kv_indptr, dtype=torch.int32),
                                 torch.tensor(kv_last_page_len, dtype=torch.int32))
        for wrapper, spec in zip(self._wrappers, self._specs):
            wrapper.plan(indptr, indices, last_page_len, *self._dims, q_data_type=dtype, kv_data_type=dtype,
                         **spec_kwargs(spec))
        for slot in self._slots:
            slot.owner = self
        self._planned_indptr = list(kv_indptr)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata):
        """q: [b, num_qo_heads, head_dim]; k, v: [b, num_kv_heads, head_dim] -> out: [b, num_qo_heads, head_dim]."""
        cache = self.kv_cache[layer]  # (pages, 2, kvh, ps, hd)
        # Once per step, inside the graph, by the first layer that appends here: a step's layers call in order, and a
        # layer on the fused kernels' path (`attend`) writes its K/V itself, so the first caller need not be layer 0.
        if self._copying_layer is None or layer <= self._copying_layer:
            self._copying_layer = layer
            self._kv_positions.copy_(self._positions)
        self._append_kv(k, v, *self._new_tokens, cache, *self._pages, kv_layout="HND")
        return self.attend(layer, q, meta)

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata, int8=None) -> torch.Tensor:
        """Attention only: the new K/V are already in the pool (the caller wrote them at the step's slots). int8:
        braid_kernels' Int8Rows [batch_size, num_qo_heads * head_dim] that the output is also written into as int8
        runs, where `writes_int8` (else it must be None)."""
        if self._triton is not None:
            indices, indptr, last_page_len = self._pages
            return self._triton(q, self.kv_cache[layer], indptr, indices, last_page_len, int8)
        if int8 is not None:
            raise ValueError("FlashInfer's decode does not write int8 rows (see writes_int8)")
        return self._wrappers[self._spec_index[layer]].run(q, self.kv_cache[layer])

    @property
    def writes_int8(self) -> bool:
        """Whether `attend` can also write its output as int8 runs (Braid's Triton decode serves this batch size)."""
        return self._triton is not None


def _triton_decode_fits(backend: FlashInferAttention, batch_size: int) -> bool:
    """Whether kernels.decode_attention serves a graph decode of batch_size rows (see TRITON_DECODE_MAX_ROWS)."""
    page_size = backend.page_size
    if (batch_size > TRITON_DECODE_MAX_ROWS or backend.head_dim not in TRITON_DECODE_HEAD_DIMS
            or page_size & (page_size - 1) or backend.plain_reason is not None):
        return False
    try:
        import triton  # noqa: F401  (FlashInfer does not need it; the `gpu` extra installs it)
    except ImportError:
        return False
    return True


class _TritonDecode:
    """kernels.decode_attention for graph decodes of `batch_size` rows, with its split-KV workspace allocated once
    (its arrival counters must persist from replay to replay) and the slice count fixed for the captured grid."""

    def __init__(self, backend: FlashInferAttention, batch_size: int, max_num_kv_indices: int):
        from braid_kernels.decode_attention import DecodeWorkspace, decode_attention, default_num_splits

        device = backend.kv_cache.device
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = default_num_splits(batch_size, backend.num_kv_heads, backend.head_dim, num_sms,
                                    max_kv_len=max_num_kv_indices * backend.page_size)
        self._workspace = DecodeWorkspace.allocate(batch_size, backend.num_qo_heads, backend.num_kv_heads,
                                                   backend.head_dim, splits, device)
        self._attend = decode_attention
        self._scale = backend.scale

    def __call__(self, q: torch.Tensor, cache: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                 kv_last_page_len: torch.Tensor, int8=None) -> torch.Tensor:
        return self._attend(q, cache, kv_indptr, kv_indices, kv_last_page_len, self._scale, workspace=self._workspace,
                            int8=int8, tables_ready=True)  # `plan` copies the tables from the host before a replay


@dataclass(frozen=True)
class _PrefillBuffers:
    """Device arrays that captured prefills read: two requests (the sequence, then the padding rows)."""

    qo_indptr: torch.Tensor  # [3] int32
    kv_indptr: torch.Tensor  # [3] int32
    kv_last_page_len: torch.Tensor  # [2] int32
    kv_indices: torch.Tensor  # [max_num_kv_indices] int32

    @classmethod
    def allocate(cls, max_num_kv_indices: int, device: torch.device) -> _PrefillBuffers:
        def zeros(n):
            return torch.zeros(n, dtype=torch.int32, device=device)

        return cls(zeros(3), zeros(3), zeros(2), zeros(max_num_kv_indices))


class FlashInferGraphPrefill:
    """Causal paged prefill attention over exactly `num_rows` query rows that a CUDA graph can capture: one sequence's
    new tokens (the first rows), then padding rows. FlashInfer's CUDA-graph prefill wrapper fixes the request count
    and the total rows at capture, so the padding is a second request whose rows attend causally to as many tokens of
    the scratch page (repeated), a valid attention whose output is dropped; with no padding it has no rows (FlashInfer
    schedules no work for it). The wrapper runs FlashInfer's fa2 kernels, whose CUDA-graph schedule splits a long
    cached prefix's KV over the SMs. `plan` (host side, never captured) rewrites the buffers before each replay.
    """

    def __init__(self, backend: FlashInferAttention, num_rows: int, buffers: _PrefillBuffers):
        import flashinfer

        self.kv_cache = backend.kv_cache
        self.page_size = backend.page_size
        self.num_rows = num_rows
        self._dims = (backend.num_qo_heads, backend.num_kv_heads, backend.head_dim, backend.page_size)
        self._specs, self._spec_index = backend.distinct_specs, backend.spec_index
        # Every token count shares one int workspace per spec: plan() runs before each replay.
        self._wrappers = [backend.plan_slot("prefill", i).wrapper(
            flashinfer.BatchPrefillWithPagedKVCacheWrapper, "HND", use_cuda_graph=True, qo_indptr_buf=buffers.qo_indptr,
            paged_kv_indptr_buf=buffers.kv_indptr, paged_kv_indices_buf=buffers.kv_indices,
            paged_kv_last_page_len_buf=buffers.kv_last_page_len, backend="fa2")
            for i in range(len(self._specs))]

    def plan(self, num_tokens: int, pages: list[int], kv_len: int, scratch_page: int) -> None:
        """The next replay: the sequence's last `num_tokens` (<= num_rows) of its `kv_len` KV tokens are new (their
        K/V written during the replay), its KV in `pages`; rows past num_tokens are padding over `scratch_page`."""
        ps, num_pad = self.page_size, self.num_rows - num_tokens
        if not 0 <= num_tokens <= self.num_rows or kv_len < num_tokens or kv_len < 1:
            raise ValueError(f"{num_tokens} new of {kv_len} tokens do not fit a prefill of {self.num_rows} rows")
        pad_len = max(1, num_pad)  # with no padding rows, the padding request still spans one page
        tables = paged_kv_tables([pages, [scratch_page] * (-(-pad_len // ps))], [kv_len, pad_len], ps)
        indices = torch.tensor(tables.kv_indices, dtype=torch.int32)
        dtype = self.kv_cache.dtype

        def host(values):
            return torch.tensor(values, dtype=torch.int32)

        dev_indices = indices.to(self.kv_cache.device, non_blocking=True)
        for wrapper, spec in zip(self._wrappers, self._specs):
            wrapper.plan(host([0, num_tokens, self.num_rows]), host(tables.kv_indptr), dev_indices,
                         host(tables.kv_last_page_len), *self._dims, causal=True, q_data_type=dtype,
                         kv_data_type=dtype, **spec_kwargs(spec))

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata):
        """q: [num_rows, num_qo_heads, head_dim]; k, v: [num_rows, num_kv_heads, head_dim]. Writes the new K/V at
        meta.slot_mapping (padding rows: -1, the last slot of the pool's last page, the scratch page), then attends."""
        write_kv(self.kv_cache[layer], meta.slot_mapping, k, v)
        return self.attend(layer, q, meta)

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention only: the new K/V are already in the pool (the fused kernel skips the padding rows' slots)."""
        return self._wrappers[self._spec_index[layer]].run(q, self.kv_cache[layer])


def spec_kwargs(spec: AttentionSpec) -> dict:
    """A layer spec as the keyword arguments of a FlashInfer wrapper's plan()."""
    return {"sm_scale": spec.scale, "window_left": spec.window_left, "logits_soft_cap": spec.logits_soft_cap}


def _host_arrays(meta: AttentionMetadata, page_size: int) -> tuple[dict[str, torch.Tensor], list[int]]:
    """int32 CPU arrays in FlashInfer's CSR form: per sequence (B) its query rows and KV pages (all but the page ids,
    which stay on the device); per new token (T) its sequence and its position in that sequence's KV. Also kv_indptr
    as a list."""
    kv_lens = [s.context_len for s in meta.spans]
    kv_indptr, kv_last_page_len = paged_kv_layout(kv_lens, page_size)
    q_len = torch.tensor([s.q_len for s in meta.spans], dtype=torch.int32)  # (B,)
    kv_len = torch.tensor(kv_lens, dtype=torch.int32)  # (B,)
    zero = torch.zeros(1, dtype=torch.int32)
    qo_indptr = torch.cat([zero, q_len.cumsum(0, dtype=torch.int32)])  # (B + 1,)
    batch_indices = torch.repeat_interleave(torch.arange(len(meta.spans), dtype=torch.int32), q_len)  # (T,)
    # Token j of sequence b sits at KV position kv_len[b] - q_len[b] + (j - qo_indptr[b]).
    positions = torch.arange(meta.num_tokens, dtype=torch.int32) + (kv_len - q_len - qo_indptr[:-1])[batch_indices]
    return {
        "qo_indptr": qo_indptr,
        "kv_indptr": torch.tensor(kv_indptr, dtype=torch.int32),  # (B + 1,)
        "kv_last_page_len": torch.tensor(kv_last_page_len, dtype=torch.int32),  # (B,) in [1, page_size]
        "batch_indices": batch_indices,
        "positions": positions,
    }, kv_indptr
