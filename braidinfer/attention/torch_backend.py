"""Paged attention in plain PyTorch: runs on CPU and CUDA, and is the reference for every faster backend."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from braidinfer.attention.metadata import AttentionMetadata


class TorchAttention:
    """Writes new K/V into the page pool, then runs SDPA per sequence over K/V gathered through its page table.

    kv_cache: [num_layers, num_pages, 2, num_kv_heads, page_size, head_dim] (FlashInfer's HND layout).
    """

    def __init__(self, kv_cache: torch.Tensor, scale: float):
        self.kv_cache = kv_cache
        self.page_size = kv_cache.shape[4]
        self.scale = scale

    def plan(self, meta: AttentionMetadata) -> None:
        """Once per step, before the forward (the call every backend takes): nothing to prepare here, each layer reads
        the page tables of `meta` itself."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata):
        """q: [T, num_qo_heads, head_dim]; k, v: [T, num_kv_heads, head_dim] -> out: [T, num_qo_heads, head_dim]."""
        write_kv(self.kv_cache[layer], meta.slot_mapping, k, v)
        return self.attend(layer, q, meta)

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention only: the step's new K/V are already in the pool."""
        cache = self.kv_cache[layer]  # (pages, 2, kvh, ps, hd)
        out = torch.empty_like(q)
        for span in meta.spans:
            qs = q[span.q_start : span.q_start + span.q_len].transpose(0, 1)  # (qh, q_len, hd)
            ks, vs = self._gather(cache, span.page_table, span.context_len)  # (kvh, L, hd)
            fresh = span.q_len == span.context_len > 1  # a whole prompt: plain causal (the fused kernels take it)
            o = F.scaled_dot_product_attention(
                qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0),
                attn_mask=None if fresh else _causal_mask(span.q_len, span.context_len, q.device),
                is_causal=fresh, scale=self.scale, enable_gqa=True,
            )  # (1, qh, q_len, hd)
            out[span.q_start : span.q_start + span.q_len] = o[0].transpose(0, 1)
        return out

    @staticmethod
    def _gather(cache: torch.Tensor, page_table: torch.Tensor, context_len: int):
        kv = cache[page_table]  # (P, 2, kvh, ps, hd)
        kv = kv.permute(1, 2, 0, 3, 4).flatten(2, 3)  # (2, kvh, P * ps, hd)
        return kv[0, :, :context_len], kv[1, :, :context_len]


def write_kv(cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Writes k, v [T, kv_heads, head_dim] into one layer's pool [pages, 2, kv_heads, page_size, head_dim] at
    slot_mapping [T] (page * page_size + offset; a slot of -1 lands in the pool's last slot)."""
    page_size = cache.shape[3]
    pages, offsets = slot_mapping // page_size, slot_mapping % page_size
    cache[pages, 0, :, offsets] = k.to(cache.dtype)
    cache[pages, 1, :, offsets] = v.to(cache.dtype)


def _causal_mask(q_len: int, context_len: int, device) -> torch.Tensor | None:
    """Query i (absolute position context_len - q_len + i) sees keys 0..its own position; None when it sees all."""
    if q_len == 1:
        return None
    q_pos = torch.arange(context_len - q_len, context_len, device=device)
    return torch.arange(context_len, device=device)[None, :] <= q_pos[:, None]  # (q_len, L)
