"""Paged attention through FlashInfer on CUDA: one plan per step shared by every layer, then two kernels per layer
(append the new K/V to the page pool, attend through the page tables).

FlashInfer is imported only when this backend is built, so the engine runs where it is not installed.
"""
from __future__ import annotations

import torch

from braidinfer.attention.metadata import AttentionMetadata

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128, 256)
WORKSPACE_BYTES = 256 << 20  # split-KV partial results; FlashInfer recommends >= 128 MiB


def unsupported_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the FlashInfer backend cannot run with these settings, or None when it can."""
    if device.type != "cuda":
        return f"it needs a CUDA device, the engine runs on {device}"
    if dtype not in SUPPORTED_DTYPES:
        return f"it needs float16 or bfloat16 weights and KV, got {str(dtype).removeprefix('torch.')}"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"it supports head_dim {SUPPORTED_HEAD_DIMS}, the model has {head_dim}"
    try:
        import flashinfer  # noqa: F401
    except Exception as e:  # ImportError, or a broken install failing on its CUDA libraries
        return f"flashinfer cannot be imported ({type(e).__name__}: {e}); install the `gpu` extra"
    return None


class FlashInferAttention:
    """Same call as TorchAttention; `plan(meta)` runs once per step, before the forward, for all layers.

    kv_cache: [num_layers, num_pages, 2, num_kv_heads, page_size, head_dim] (HND), float16/bfloat16, on CUDA.
    Steps with any q_len > 1 (prefill, chunked prefill, prefill mixed with decodes) use the paged prefill kernel with
    a causal mask aligned to the end of each sequence's KV; decode-only steps use the paged decode kernel.
    """

    def __init__(self, kv_cache: torch.Tensor, scale: float, num_qo_heads: int):
        import flashinfer

        self.kv_cache = kv_cache
        _, _, _, self.num_kv_heads, self.page_size, self.head_dim = kv_cache.shape
        self.num_qo_heads = num_qo_heads
        self.scale = scale
        # Shared by both wrappers: only one of them runs in a step. Zeroed, as the decode wrapper asks on first use.
        workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=kv_cache.device)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, kv_layout="HND")
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, kv_layout="HND")
        self._append_kv = flashinfer.append_paged_kv_cache
        self._planned: AttentionMetadata | None = None  # the step that plan() last prepared
        self._wrapper = None
        self._new_tokens: tuple[torch.Tensor, ...] = ()  # (batch_indices, positions) on the device
        self._pages: tuple[torch.Tensor, ...] = ()  # (kv_indices, kv_indptr, kv_last_page_len) on the device

    def plan(self, meta: AttentionMetadata) -> None:
        """Builds the step's page-table arrays (on the host, one copy to the device) and plans the kernel."""
        host = _host_arrays(meta, self.page_size)
        flat = torch.cat(list(host.values())).to(self.kv_cache.device, non_blocking=True)
        dev = dict(zip(host, flat.split([t.numel() for t in host.values()])))
        num_pages = (host["kv_indptr"][1:] - host["kv_indptr"][:-1]).tolist()
        kv_indices = torch.cat([s.page_table[:n] for s, n in zip(meta.spans, num_pages)]).to(torch.int32)
        self._new_tokens = (dev["batch_indices"], dev["positions"])
        self._pages = (kv_indices, dev["kv_indptr"], dev["kv_last_page_len"])
        dtype, dims = self.kv_cache.dtype, (self.num_qo_heads, self.num_kv_heads, self.head_dim, self.page_size)
        # The wrappers take the small indptr arrays from the host (they need them there to plan) and the page
        # indices from the device.
        if meta.is_decode_only:
            self._decode.plan(host["kv_indptr"], kv_indices, host["kv_last_page_len"], *dims,
                              q_data_type=dtype, kv_data_type=dtype, sm_scale=self.scale)
            self._wrapper = self._decode
        else:
            self._prefill.plan(host["qo_indptr"], host["kv_indptr"], kv_indices, host["kv_last_page_len"], *dims,
                               causal=True, q_data_type=dtype, kv_data_type=dtype, sm_scale=self.scale)
            self._wrapper = self._prefill
        self._planned = meta

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata):
        """q: [T, num_qo_heads, head_dim]; k, v: [T, num_kv_heads, head_dim] -> out: [T, num_qo_heads, head_dim]."""
        if meta is not self._planned:
            raise RuntimeError("FlashInferAttention.plan(meta) must be called once per step before the forward")
        cache = self.kv_cache[layer]  # (pages, 2, kvh, ps, hd)
        if k.dtype != cache.dtype or v.dtype != cache.dtype:  # the kernel reinterprets k/v as the cache's dtype
            raise TypeError(f"k/v dtype {k.dtype}/{v.dtype} differs from the KV cache's {cache.dtype}")
        self._append_kv(k, v, *self._new_tokens, cache, *self._pages, kv_layout="HND")  # k, v may be strided views
        return self._wrapper.run(q, cache)


def _host_arrays(meta: AttentionMetadata, page_size: int) -> dict[str, torch.Tensor]:
    """int32 CPU arrays in FlashInfer's CSR form: per sequence (B) its query rows and KV pages; per new token (T)
    its sequence and its position in that sequence's KV."""
    q_len = torch.tensor([s.q_len for s in meta.spans], dtype=torch.int32)  # (B,)
    kv_len = torch.tensor([s.context_len for s in meta.spans], dtype=torch.int32)  # (B,)
    num_pages = (kv_len + page_size - 1) // page_size  # (B,)
    zero = torch.zeros(1, dtype=torch.int32)
    qo_indptr = torch.cat([zero, q_len.cumsum(0, dtype=torch.int32)])  # (B + 1,)
    batch_indices = torch.repeat_interleave(torch.arange(len(meta.spans), dtype=torch.int32), q_len)  # (T,)
    # Token j of sequence b sits at KV position kv_len[b] - q_len[b] + (j - qo_indptr[b]).
    positions = torch.arange(meta.num_tokens, dtype=torch.int32) + (kv_len - q_len - qo_indptr[:-1])[batch_indices]
    return {
        "qo_indptr": qo_indptr,
        "kv_indptr": torch.cat([zero, num_pages.cumsum(0, dtype=torch.int32)]),  # (B + 1,)
        "kv_last_page_len": kv_len - (num_pages - 1) * page_size,  # (B,) in [1, page_size]
        "batch_indices": batch_indices,
        "positions": positions,
    }
