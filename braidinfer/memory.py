"""How many KV pages the engine allocates.

By default the pool holds what the engine can use, `max_num_seqs` requests of `max_model_len` tokens, capped by the
memory budget: on the CPU `cpu_kv_cache_bytes`; on CUDA `gpu_memory_utilization` of the card minus what is in use
(other processes, and tensors this process holds: weights, other engines) and the activations of the largest step.
Memory that PyTorch's caching allocator holds but no tensor uses (e.g. left by an engine closed earlier) counts as
free. A CUDA pool that cannot hold one request of `max_model_len` tokens fails at construction."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from braidinfer.attention.flashinfer_backend import cache_head_dim
from braidinfer.config import EngineConfig
from braidinfer.errors import OutOfPagesError
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
    return gpu_pages(config, memory, per_page, activation_bytes(config, model, dtype), needed, max_model_len)


def gpu_pages(config: EngineConfig, memory: DeviceMemory, per_page: int, activations: int, needed: int,
              max_model_len: int) -> int:
    """The CUDA page count from a memory snapshot (pure arithmetic, tested without a GPU)."""
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
            f"{memory.used_by_others / _GIB:.1f} GiB and the activations need {activations / _GIB:.2f} GiB; "
            "lower max_model_len, raise gpu_memory_utilization, or close other engines")
    return min(needed, fits)
