"""How many KV pages the engine allocates.

By default the pool holds what the engine can use, `max_num_seqs` requests of `max_model_len` tokens, capped by the
memory budget: on the CPU `cpu_kv_cache_bytes`; on CUDA `gpu_memory_utilization` of the card minus what is in use
(other processes, and tensors this process holds: weights, other engines), the activations of the largest step and
what the engine allocates once the pool exists (`runtime_bytes`: attention workspaces, the CUDA graphs' memory,
loaded kernels).
Memory that PyTorch's caching allocator holds but no tensor uses (e.g. left by an engine closed earlier) counts as
free. A CUDA pool that cannot hold one request of `max_model_len` tokens fails at construction."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from braidinfer.attention.flashinfer_backend import INT_WORKSPACE_BYTES, WORKSPACE_BYTES, cache_head_dim
from braidinfer.config import EngineConfig
from braidinfer.errors import OutOfPagesError
from braidinfer.graph_buckets import PREFILL_GRAPH_TOKENS, graph_batch_sizes
from braidinfer.models import ModelConfig

_GIB = 1 << 30


@dataclass(frozen=True)
class DeviceMemory:
    """A snapshot of one CUDA device's memory, in bytes."""

    total: int
    free: int
    """Free as the driver sees it."""
    reserved: int
    """Held by this process's PyTorch caching allocator (in use or cached)."""
    allocated: int
    """Held by live tensors of this process."""

    @classmethod
    def read(cls, device: torch.device) -> DeviceMemory:
        free, total = torch.cuda.mem_get_info(device)
        return cls(total, free, torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device))

    @property
    def available(self) -> int:
        """Free memory plus what PyTorch caches without using it."""
        return self.free + self.reserved - self.allocated

    @property
    def used_by_others(self) -> int:
        """In use outside this process's PyTorch allocator (other processes, CUDA contexts, other libraries)."""
        return self.total - self.free - self.reserved


def page_bytes(model: ModelConfig, page_size: int, dtype: torch.dtype, head_dim: int | None = None) -> int:
    """Bytes of one KV page across all layers (K and V), of heads `head_dim` wide (None: the model's)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return model.num_hidden_layers * 2 * model.num_key_value_heads * page_size * (head_dim or model.head_dim) * elem


def activation_bytes(config: EngineConfig, model: ModelConfig, dtype: torch.dtype) -> int:
    """What the largest step needs besides weights and KV: a few hidden/intermediate-wide buffers per token and
    float32 copies of the logits."""
    elem = torch.empty((), dtype=dtype).element_size()
    per_token = (8 * model.hidden_size + 4 * model.intermediate_size) * elem
    return config.max_num_batched_tokens * per_token + config.max_num_seqs * model.vocab_size * 4 * 3


def runtime_bytes(config: EngineConfig, model: ModelConfig, dtype: torch.dtype, per_page: int,
                  max_model_len: int) -> int:
    """What the engine takes on CUDA besides weights, KV pages and activations, most of it allocated after the pool
    is sized: FlashInfer's float workspace and its wrappers' plans (`INT_WORKSPACE_BYTES` each, budgeted for two
    layer specs); with CUDA graphs also the graphs' scratch page, their plan slots, their private memory pool and
    static buffers, and their page tables. `_LIBRARY_BYTES` is what the first engine of a process adds outside
    PyTorch (kernel code loaded onto the card, library handles): on an H100 a fresh process grew by 68 MiB eager and
    208 MiB with graphs."""
    specs = 2  # Gemma's sliding-window and global layers: two wrappers of each kind
    eager = WORKSPACE_BYTES + 2 * specs * INT_WORKSPACE_BYTES + _LIBRARY_BYTES[config.enforce_eager]
    if config.enforce_eager:
        return eager
    elem = torch.empty((), dtype=dtype).element_size()
    rows = max(graph_batch_sizes(config.max_num_seqs)[-1], max(PREFILL_GRAPH_TOKENS))
    graph_activations = rows * (8 * model.hidden_size + 4 * model.intermediate_size) * elem
    tables = 4 * 4 * rows * (_pages_per_request(config, max_model_len) + 2)  # int32 page indices, a few copies
    plan_slots = (2 * specs + 2) * INT_WORKSPACE_BYTES  # decode and prefill graphs per spec, the cascade's two
    return eager + per_page + plan_slots + graph_activations + tables + _GRAPH_POOL_BYTES


_LIBRARY_BYTES = {True: 128 << 20, False: 256 << 20}  # by enforce_eager; measured: 68 and 208 MiB (H100)
_GRAPH_POOL_BYTES = 160 << 20
"""The CUDA graphs' memory beyond their activations and plan slots: the private pool's segments and static buffers
of every bucket (144 MiB measured on an H100 for 17 decode buckets, their cascade twins and 5 prefill buckets)."""


def pages_needed(config: EngineConfig, max_model_len: int) -> int:
    """Pages for `max_num_seqs` requests of `max_model_len` tokens each: more could never be used at once."""
    return config.max_num_seqs * _pages_per_request(config, max_model_len)


def _pages_per_request(config: EngineConfig, max_model_len: int) -> int:
    return -(-max_model_len // config.page_size)


def num_kv_pages(config: EngineConfig, model: ModelConfig, dtype: torch.dtype, device: torch.device,
                 max_model_len: int, kv_dtype: torch.dtype | None = None) -> int:
    """The page count: `config.num_kv_pages` when given, else what the engine can use capped by the memory budget.
    dtype: the model's (its activations); kv_dtype: the pool's (None: dtype).

    Raises OutOfPagesError on CUDA when the budget cannot hold one request of `max_model_len` tokens."""
    if config.num_kv_pages:
        return config.num_kv_pages
    kv_dtype = kv_dtype or dtype
    needed = pages_needed(config, max_model_len)
    if device.type != "cuda":
        return max(1, min(needed, config.cpu_kv_cache_bytes // page_bytes(model, config.page_size, kv_dtype)))
    # FlashInfer's pool may pad the heads (flashinfer_backend.cache_head_dim); budget for the wider one.
    per_page = page_bytes(model, config.page_size, kv_dtype, cache_head_dim(model.head_dim))
    memory = DeviceMemory.read(device)
    overhead = activation_bytes(config, model, dtype) + runtime_bytes(config, model, dtype, per_page, max_model_len)
    return gpu_pages(config, memory, per_page, overhead, needed, max_model_len)


def gpu_pages(config: EngineConfig, memory: DeviceMemory, per_page: int, activations: int, needed: int,
              max_model_len: int) -> int:
    """The CUDA page count from a memory snapshot (pure arithmetic, tested without a GPU). `activations`: all the
    engine needs besides weights and KV pages (activations, workspaces, CUDA graphs)."""
    in_use = memory.total - memory.available  # other processes + live tensors of this one (weights included)
    budget = memory.total * config.gpu_memory_utilization - in_use - activations
    fits = max(0, int(budget // per_page))
    one_request = _pages_per_request(config, max_model_len)
    if fits < one_request:
        raise OutOfPagesError(
            f"the KV cache fits {fits * config.page_size} tokens but one request of max_model_len={max_model_len} "
            f"tokens needs {one_request * config.page_size}: of the GPU's {memory.total / _GIB:.1f} GiB, "
            f"gpu_memory_utilization={config.gpu_memory_utilization} allows "
            f"{memory.total * config.gpu_memory_utilization / _GIB:.1f} GiB, of which tensors of this process "
            f"(weights, other engines) hold {memory.allocated / _GIB:.1f} GiB, other processes "
            f"{memory.used_by_others / _GIB:.1f} GiB and activations, workspaces and CUDA graphs need "
            f"{activations / _GIB:.2f} GiB; "
            "lower max_model_len, raise gpu_memory_utilization, or close other engines")
    return min(needed, fits)
