"""How many KV pages the engine allocates: on the CPU a byte budget, on CUDA what the memory budget leaves after
the weights and the activations of the largest step."""
from __future__ import annotations

import torch

from braidinfer.config import EngineConfig
from braidinfer.models import ModelConfig


def page_bytes(model: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV page across all layers (K and V)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return model.num_hidden_layers * 2 * model.num_key_value_heads * page_size * model.head_dim * elem


def num_kv_pages(config: EngineConfig, model: ModelConfig, dtype: torch.dtype, device: torch.device) -> int:
    """The page count: `config.num_kv_pages` when given, else what the memory budget holds (at least one)."""
    if config.num_kv_pages:
        return config.num_kv_pages
    per_page = page_bytes(model, config.page_size, dtype)
    if device.type != "cuda":
        return max(1, config.cpu_kv_cache_bytes // per_page)
    free, total = torch.cuda.mem_get_info(device)
    elem = torch.empty((), dtype=dtype).element_size()
    # Activations of the largest step (a few hidden/intermediate-wide buffers per token) and its logits.
    activations = config.max_num_batched_tokens * (8 * model.hidden_size + 4 * model.intermediate_size) * elem
    activations += config.max_num_seqs * model.vocab_size * 4 * 3
    budget = total * config.gpu_memory_utilization - (total - free) - activations
    return max(1, int(budget // per_page))
