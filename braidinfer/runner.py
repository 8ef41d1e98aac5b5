"""Turns a scheduled batch into tensors, runs the model over it and returns the logits to sample from."""
from __future__ import annotations

import torch

from braidinfer.attention import AttentionMetadata, SeqSpan, TorchAttention
from braidinfer.attention.flashinfer_backend import FlashInferAttention, unsupported_reason
from braidinfer.errors import InvalidRequestError
from braidinfer.models.config import ModelConfig
from braidinfer.models.forward_batch import ForwardBatch
from braidinfer.scheduler import ScheduledBatch


class ModelRunner:
    """Owns the model and the KV page pool [layers, pages, 2, kv_heads, page_size, head_dim] on one device."""

    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, num_pages: int, page_size: int,
                 device: torch.device, dtype: torch.dtype, attention_backend: str = "torch"):
        self.model = model
        self.device = device
        self.page_size = page_size
        self.kv_cache = torch.zeros(
            cfg.num_hidden_layers, num_pages, 2, cfg.num_key_value_heads, page_size, cfg.head_dim,
            dtype=dtype, device=device,
        )
        self.attention = _make_attention(attention_backend, self.kv_cache, cfg)
        self._plan = getattr(self.attention, "plan", None)  # backends that plan once per step for all layers

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Computes the batch's new tokens. Returns logits [N, vocab] float32 for the N sequences whose every token now
        has KV (they sample next; prefill-only sequences never do), and the indices of those sequences in the batch."""
        input_ids, positions, slots, spans, sample_rows, sample_idx = [], [], [], [], [], []
        page_tables = self._page_tables(batch)
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            q_start = len(input_ids)
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            pt, ps = seq.page_table, self.page_size
            slots.extend(pt[p // ps] * ps + p % ps for p in range(start, end))
            spans.append(SeqSpan(q_start, n, end, page_tables[i]))
            if end == seq.num_tokens and not seq.prefill_only:
                sample_rows.append(q_start + n - 1)
                sample_idx.append(i)
        meta = AttentionMetadata(spans, self._tensor(slots), len(input_ids))
        if self._plan is not None:
            self._plan(meta)
        fb = ForwardBatch(positions=self._tensor(positions), meta=meta, attention=self.attention)
        hidden = self.model(self._tensor(input_ids), fb)  # (T, hidden)
        if not sample_rows:
            return hidden.new_empty(0, 0, dtype=torch.float32), []
        return self.model.compute_logits(hidden[self._tensor(sample_rows)]), sample_idx

    @torch.inference_mode()
    def copy_composed(self, seq) -> None:
        """Copies the KV of a composed prompt's independent chunks into its pages: each chunk was computed at
        positions 0.. on its own; its keys are rotated to the chunk's position in the prompt, values copied."""
        ps = self.page_size
        k_pool = self.kv_cache.select(2, 0).permute(1, 3, 0, 2, 4)  # [pages, page_size, layers, kv_heads, head_dim]
        v_pool = self.kv_cache.select(2, 1).permute(1, 3, 0, 2, 4)
        table = self._tensor(seq.page_table)
        for position, chunk in seq.compose:
            src = torch.arange(chunk.num_tokens, device=self.device)
            src_pages, src_off = self._tensor(list(chunk.pages))[src // ps], src % ps
            dst = src + position
            dst_pages, dst_off = table[dst // ps], dst % ps
            k = k_pool[src_pages, src_off]
            k_pool[dst_pages, dst_off] = self.model.shift_keys(k, position) if position else k
            v_pool[dst_pages, dst_off] = v_pool[src_pages, src_off]

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64).to(self.device, non_blocking=True)

    def _page_tables(self, batch: ScheduledBatch) -> list[torch.Tensor]:
        # One host-to-device copy for all page tables, then views per sequence.
        flat = self._tensor([p for seq in batch.seqs for p in seq.page_table])
        return list(flat.split([len(seq.page_table) for seq in batch.seqs]))


def _make_attention(name: str, kv_cache: torch.Tensor, cfg: ModelConfig) -> TorchAttention | FlashInferAttention:
    """The attention backend `name` ("auto", "torch" or "flashinfer") over the page pool."""
    scale = cfg.head_dim**-0.5
    problem = unsupported_reason(kv_cache.device, kv_cache.dtype, cfg.head_dim) if name != "torch" else None
    if name == "torch" or (name == "auto" and problem):
        return TorchAttention(kv_cache, scale)
    if problem:
        raise InvalidRequestError(f"attention_backend 'flashinfer' cannot run: {problem}")
    return FlashInferAttention(kv_cache, scale, cfg.num_attention_heads)
