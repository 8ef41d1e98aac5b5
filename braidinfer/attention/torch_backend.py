"""Paged attention in plain PyTorch: runs on CPU and CUDA, and is the reference for every faster backend."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from braidinfer.attention.metadata import AttentionMetadata
from braidinfer.attention.spec import AttentionSpec, per_layer_specs


class TorchAttention:
    """Writes new K/V into the page pool, then attends per sequence over K/V gathered through its page table: SDPA
    for plain layers, explicit scores for soft-capped ones (the reference the FlashInfer paths are tested against).

    kv_cache: [num_layers, num_pages, 2, num_kv_heads, page_size, head_dim] (FlashInfer's HND layout), of the model's
    dtype or another (new K/V are cast to it when written).
    specs: one AttentionSpec per layer (scale, sliding window, soft-cap), or one scale for plain attention everywhere.
    """

    def __init__(self, kv_cache: torch.Tensor, specs: list[AttentionSpec] | float):
        self.kv_cache = kv_cache
        self.page_size = kv_cache.shape[4]
        self.specs = per_layer_specs(specs, kv_cache.shape[0])
        self._rows: tuple[AttentionMetadata, torch.Tensor] | None = None  # (the step's meta, kv_rows of its slots)
        self._decode: tuple[AttentionMetadata, torch.Tensor, torch.Tensor] | None = None  # see _decode_pages
        self._step_rows: tuple[AttentionMetadata, tuple] | None = None  # see decode_rows
        self._prompt: tuple[AttentionMetadata, tuple] | None = None  # see prompt_part

    def plan(self, meta: AttentionMetadata) -> None:
        """Once per step, before the forward (the call every backend takes). Nothing to prepare ahead: the pool rows
        of the step's new K/V, which every layer writing through this backend needs, are computed by the first such
        layer (`_planned_rows`), so a step whose layers all write through Braid's C attention never computes them."""

    def _planned_rows(self, meta: AttentionMetadata) -> torch.Tensor:
        """kv_rows of the step's slots, once per step."""
        if self._rows is None or self._rows[0] is not meta:
            self._rows = (meta, kv_rows(self.kv_cache[0], meta.slot_mapping))
        return self._rows[1]

    def decode_rows(self, meta: AttentionMetadata):
        """(index, rows) of the step's decoding sequences (spans of generated tokens, SeqSpan.generated), built once
        per step: `index` their rows of the step ([D] int64; None when every row decodes), `rows` those rows as
        braid_kernels/cpu_attention.c reads them (its StepRows; None when no sequence decodes). A prompt's last
        token left alone by a prefix-cache hit is not decoding: a row's path must not depend on the cache."""
        if self._step_rows is None or self._step_rows[0] is not meta:
            from braid_kernels.cpu_attention import step_rows  # on use: braid_kernels reads TRITON_INTERPRET

            decoding = [span for span in meta.spans if span.generated]
            if sum(span.q_len for span in decoding) == meta.slot_mapping.shape[0]:
                found = (None, step_rows(decoding, meta.slot_mapping))
            elif decoding:
                index = span_rows(decoding)
                found = (index, step_rows(decoding, meta.slot_mapping[index]))
            else:
                found = (None, None)
            self._step_rows = (meta, found)
        return self._step_rows[1]

    def prompt_part(self, meta: AttentionMetadata) -> tuple[torch.Tensor, AttentionMetadata]:
        """(index, meta) of the step's prompt rows (spans not of generated tokens), built once per step: `index` their
        rows of the step ([P] int64), `meta` those rows alone (their spans from row 0 on, their slots), which the
        layers attend over through this backend while the decoding rows take the C kernel (decode_rows)."""
        if self._prompt is None or self._prompt[0] is not meta:
            prompt, spans, row = [span for span in meta.spans if not span.generated], [], 0
            for span in prompt:  # renumbered from row 0
                spans.append(dataclasses.replace(span, q_start=row))
                row += span.q_len
            rows = span_rows(prompt)
            self._prompt = (meta, (rows, AttentionMetadata(spans, meta.slot_mapping[rows], row)))
        return self._prompt[1]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata):
        """q: [T, num_qo_heads, head_dim]; k, v: [T, num_kv_heads, head_dim] -> out: [T, num_qo_heads, head_dim]."""
        write_kv_rows(self.kv_cache[layer], self._planned_rows(meta), k, v)
        return self.attend(layer, q, meta)

    def attend(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention only: the step's new K/V are already in the pool (which may hold another dtype than q: a
        bfloat16 pool under a float32 model, EngineConfig.kv_cache_dtype); the output has q's dtype."""
        cache, spec = self.kv_cache[layer], self.specs[layer]  # (pages, 2, kvh, ps, hd)
        if len(meta.spans) == 1 and meta.spans[0].q_len == q.shape[0]:  # one sequence: its output is the step's
            return self._attend_span(q.transpose(0, 1), cache, spec, meta.spans[0]).transpose(0, 1)
        if meta.is_decode_only and q.shape[0] == len(meta.spans) and spec.logits_soft_cap is None \
                and spec.sliding_window is None:
            return self._attend_decode(q, cache, spec, meta)
        out = torch.empty_like(q)
        for span in meta.spans:
            qs = q[span.q_start : span.q_start + span.q_len].transpose(0, 1)  # (qh, q_len, hd)
            out[span.q_start : span.q_start + span.q_len] = self._attend_span(qs, cache, spec, span).transpose(0, 1)
        return out

    def _attend_decode(self, q: torch.Tensor, cache: torch.Tensor, spec: AttentionSpec,
                       meta: AttentionMetadata) -> torch.Tensor:
        """Several sequences of one new token each (rows in span order), in one SDPA call: their pages gathered side
        by side, each padded to the longest page table, the padding masked off. On the CPU, one call instead of one
        per sequence: 8 sequences decoding took 23.5% of a step in attention, one SDPA and one gather each per layer."""
        pages, visible = self._decode_pages(meta)
        num_seqs, kv_heads, head_dim = len(meta.spans), cache.shape[2], cache.shape[4]
        kv = cache.permute(1, 2, 0, 3, 4).index_select(2, pages)  # (2, kvh, B * P, ps, hd), in span order
        kv = kv.view(2, kv_heads, num_seqs, -1, head_dim).transpose(1, 2)  # (2, B, kvh, P * ps, hd), a view
        o = F.scaled_dot_product_attention(q.to(cache.dtype).unsqueeze(2), kv[0], kv[1], attn_mask=visible,
                                           scale=spec.scale, enable_gqa=True)  # (B, qh, 1, hd)
        return o.squeeze(2).to(q.dtype)

    def _decode_pages(self, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Once per step for `_attend_decode`: the sequences' page tables padded with page 0 to the longest and
        flattened [B * P], and which of the B x P * page_size gathered keys each sequence sees [B, 1, 1, P * ps]."""
        if self._decode is None or self._decode[0] is not meta:
            tables = [span.page_table for span in meta.spans]
            padded = torch.nn.utils.rnn.pad_sequence(tables, batch_first=True)  # (B, P)
            device = padded.device
            lengths = torch.tensor([span.context_len for span in meta.spans]).to(device, non_blocking=True)
            keys = torch.arange(padded.shape[1] * self.page_size, device=device)
            self._decode = (meta, padded.flatten(), (keys[None, :] < lengths[:, None])[:, None, None, :])
        return self._decode[1], self._decode[2]

    def _attend_span(self, qs: torch.Tensor, cache: torch.Tensor, spec: AttentionSpec, span) -> torch.Tensor:
        """One sequence's queries qs [qh, q_len, hd] over its KV in `cache` -> [qh, q_len, hd] in qs's dtype. With
        a pool of another dtype, SDPA runs in the pool's (it accumulates in float32 either way; q is cast to it) and
        soft-capped attention in q's (K/V cast up: its scores and cap are computed in the inputs' dtype)."""
        ks, vs = self._gather(cache, span.page_table, span.context_len)  # (kvh, L, hd)
        if spec.logits_soft_cap is not None:
            return _softcapped_attention(qs, ks.to(qs.dtype), vs.to(qs.dtype), spec, span.context_len)
        fresh = span.q_len == span.context_len > 1 and spec.sliding_window is None  # plain causal prompt
        return F.scaled_dot_product_attention(
            qs.to(ks.dtype).unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0),
            attn_mask=None if fresh else _mask(span.q_len, span.context_len, spec.sliding_window, qs.device),
            is_causal=fresh, scale=spec.scale, enable_gqa=True,
        )[0].to(qs.dtype)

    @staticmethod
    def _gather(cache: torch.Tensor, page_table: torch.Tensor, context_len: int):
        # (2, kvh, P, ps, hd): one copy, already in order (index_select: 2.3x faster than indexing with [] on the CPU)
        kv = cache.permute(1, 2, 0, 3, 4).index_select(2, page_table)
        kv = kv.flatten(2, 3)  # (2, kvh, P * ps, hd), a view
        return kv[0, :, :context_len], kv[1, :, :context_len]


def span_rows(spans) -> torch.Tensor:
    """The step's rows of `spans` (q_start, q_len each), span after span: [sum of q_len] int64."""
    return torch.cat([torch.arange(span.q_start, span.q_start + span.q_len) for span in spans]) if spans else \
        torch.zeros(0, dtype=torch.int64)


def kv_rows(cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """The rows of one layer's pool [pages, 2, kv_heads, page_size, head_dim], seen as [-1, head_dim], that the K and
    V of tokens at slot_mapping [T] go to: [T * 2 * kv_heads], in (token, K/V, head) order (write_kv's slots; a slot
    of -1 is the pool's last one)."""
    num_pages, _, kv_heads, page_size, _ = cache.shape
    slots = torch.where(slot_mapping < 0, slot_mapping + num_pages * page_size, slot_mapping)  # out of range: an error
    pages, offsets = slots // page_size, slots % page_size
    kv = torch.arange(2, device=slots.device)[None, :, None]
    heads = torch.arange(kv_heads, device=slots.device)[None, None, :]
    return (((pages[:, None, None] * 2 + kv) * kv_heads + heads) * page_size + offsets[:, None, None]).flatten()


def write_kv_rows(cache: torch.Tensor, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """write_kv with the slots given as kv_rows (computed once per step for every layer): one copy of k and v."""
    kv = torch.stack((k, v), dim=1).to(cache.dtype)  # (T, 2, kv_heads, head_dim)
    cache.view(-1, cache.shape[-1]).index_copy_(0, rows, kv.reshape(-1, cache.shape[-1]))


def write_kv(cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Writes k, v [T, kv_heads, head_dim] into one layer's pool [pages, 2, kv_heads, page_size, head_dim] at
    slot_mapping [T] (page * page_size + offset; a slot of -1 lands in the pool's last slot)."""
    page_size = cache.shape[3]
    pages, offsets = slot_mapping // page_size, slot_mapping % page_size
    cache[pages, 0, :, offsets] = k.to(cache.dtype)
    cache[pages, 1, :, offsets] = v.to(cache.dtype)


def _mask(q_len: int, context_len: int, window: int | None, device) -> torch.Tensor | None:
    """Query i (absolute position p = context_len - q_len + i) sees keys 0..p, or only p - window + 1..p with a sliding
    window; None when every query sees every key."""
    if q_len == 1 and (window is None or window >= context_len):
        return None
    q_pos = torch.arange(context_len - q_len, context_len, device=device)[:, None]  # (q_len, 1)
    k_pos = torch.arange(context_len, device=device)[None, :]  # (1, L)
    visible = k_pos <= q_pos
    if window is not None:
        visible &= k_pos > q_pos - window
    return visible  # (q_len, L)


def _softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                          context_len: int) -> torch.Tensor:
    """q: [qh, q_len, hd]; k, v: [kvh, L, hd] -> [qh, q_len, hd]. Scores capped as c * tanh(s / c), then masked,
    softmax in float32 and cast back, as transformers' Gemma 2 eager attention does."""
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)  # (qh, L, hd)
    scores = torch.matmul(q, k.transpose(1, 2)) * spec.scale  # (qh, q_len, L)
    cap = spec.logits_soft_cap
    scores = torch.tanh(scores / cap) * cap
    mask = _mask(q.shape[1], context_len, spec.sliding_window, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)
