"""Attention's input preparation in one kernel: split the fused qkv projection, RMSNorm q and k per head (Qwen3's
QK-norm; skipped for Llama), rotate them by position (RoPE), return q and write k and v into the paged KV pool.

The reference composes the operations the model and the torch attention backend run today:

    q, k, v = qkv.split(...)                       # braidinfer.layers.PagedAttention.forward (PyTorch plan)
    q, k = q_norm(q), k_norm(k)                    # Qwen3's q_norm / k_norm (RMSNorm over head_dim)
    cos, sin = cos[positions].to(dtype), ...       # RotaryEmbedding.cos_sin: float32 tables, cast to the model dtype
    q, k = q * cos + rotate_half(q) * sin, ...     # apply_rotary, three roundings in bf16
    cache[page, 0, :, offset] = k; cache[page, 1, :, offset] = v   # TorchAttention, page, offset from slot_mapping

Every rounding point is reproduced (see kernels.rmsnorm for the norm's); only the order of the norm's sum of squares
differs from torch. The pool is one layer's [num_pages, 2, num_kv_heads, page_size, head_dim] (FlashInfer's HND).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_devices,
    check_last_dim_contiguous,
    check_same_dtype,
    check_shape,
    check_tensor,
)
from .numerics import launch_options, release_dependents, round_to_dtype, wait_for_inputs
from .rmsnorm import rms_norm_ref, rms_scale


def qk_norm_rope_write_kv_ref(qkv, positions, cos, sin, kv_cache, slot_mapping,
                              q_norm_weight=None, k_norm_weight=None, eps=1e-6) -> torch.Tensor:
    """The PyTorch composition `qk_norm_rope_write_kv` reproduces; same arguments and effect."""
    num_tokens, num_qo_heads, num_kv_heads, head_dim = _dims(qkv, kv_cache)
    q, k, v = qkv.split([num_qo_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.view(num_tokens, num_qo_heads, head_dim)  # (T, qh, hd)
    k = k.view(num_tokens, num_kv_heads, head_dim)  # (T, kvh, hd)
    v = v.view(num_tokens, num_kv_heads, head_dim)  # (T, kvh, hd)
    if q_norm_weight is not None:
        q, k = rms_norm_ref(q, q_norm_weight, eps), rms_norm_ref(k, k_norm_weight, eps)
    cos = cos[positions][:, None, :].to(qkv.dtype)  # (T, 1, hd)
    sin = sin[positions][:, None, :].to(qkv.dtype)  # (T, 1, hd)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    written = slot_mapping >= 0
    slots = slot_mapping[written]
    pages, offsets = slots // kv_cache.shape[3], slots % kv_cache.shape[3]
    kv_cache[pages, 0, :, offsets] = k[written].to(kv_cache.dtype)
    kv_cache[pages, 1, :, offsets] = v[written].to(kv_cache.dtype)
    return q


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def qk_norm_rope_write_kv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                          q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                          eps: float = 1e-6, *, static_weights: bool = False,
                          positions_ready: bool = False) -> torch.Tensor:
    """q, k = RMSNorm per head (when weights are given), then RoPE; k and v go into the KV pool; returns q.

    qkv: [num_tokens, (num_qo_heads + 2 * num_kv_heads) * head_dim], float32/float16/bfloat16, q then k then v
        (the model's fused qkv_proj output); num_kv_heads and head_dim are read from kv_cache.
    positions: [num_tokens] int32/int64, each token's absolute position: the row of cos and sin it uses.
    cos, sin: [max_positions, head_dim] in float32 (RotaryEmbedding's tables) or qkv's dtype, both halves of a row
        (HF's rotate_half layout); each row is cast to qkv's dtype before use, as the model does.
    kv_cache: one layer's pool [num_pages, 2, num_kv_heads, page_size, head_dim], qkv's dtype (0: keys, 1: values).
    slot_mapping: [num_tokens] int32/int64, page * page_size + offset of each token's KV slot; a negative slot
        (padding) writes nothing.
    q_norm_weight, k_norm_weight: [head_dim], qkv's dtype (Qwen3's q_norm / k_norm), both or neither; eps for both.
    static_weights: no kernel that may still be running when this one launches writes the norm weights or cos and
        sin (a model's parameters and tables): under programmatic dependent launch the norm weights are then
        loaded before waiting for the kernel ahead.
    positions_ready: the same holds for positions and slot_mapping (copied from the host before a graph replay):
        with static_weights, each token's position, slot and rows of cos and sin are then loaded before the wait
        too, so that only qkv is read after it.
    Returns q: a new [num_tokens, num_qo_heads, head_dim] tensor of qkv's dtype. Positions and slots are not range
    checked (that would synchronise with the GPU).
    """
    num_tokens, num_qo_heads, num_kv_heads, head_dim = _check(
        qkv, positions, cos, sin, kv_cache, slot_mapping, q_norm_weight, k_norm_weight, eps)
    q = torch.empty((num_tokens, num_qo_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q
    has_qk_norm = q_norm_weight is not None
    _qk_norm_rope_kernel[(num_tokens, num_qo_heads + 2 * num_kv_heads)](
        qkv, q, kv_cache, positions, slot_mapping, cos, sin,
        q_norm_weight if has_qk_norm else qkv, k_norm_weight if has_qk_norm else qkv,  # not read without the norm
        float(eps), qkv.stride(0), q.stride(0), cos.stride(0), sin.stride(0),
        *kv_cache.stride()[:4], kv_cache.shape[3],
        NUM_QO_HEADS=num_qo_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HALF_BLOCK=triton.next_power_of_2(head_dim // 2), HAS_QK_NORM=has_qk_norm,
        MEAN_BY_RECIPROCAL=qkv.is_cuda, NORM_FIRST=static_weights, INDEX_FIRST=static_weights and positions_ready,
        num_warps=1 if head_dim <= 128 else 2, **launch_options(qkv),
    )
    return q


def _dims(qkv: torch.Tensor, kv_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """(num_tokens, num_qo_heads, num_kv_heads, head_dim) of a qkv row layout and a one-layer pool."""
    num_kv_heads, head_dim = kv_cache.shape[2], kv_cache.shape[4]
    return qkv.shape[0], qkv.shape[1] // head_dim - 2 * num_kv_heads, num_kv_heads, head_dim


def _check(qkv, positions, cos, sin, kv_cache, slot_mapping, q_norm_weight, k_norm_weight, eps):
    check_tensor("qkv", qkv, FLOAT_DTYPES, ndim=2)
    check_tensor("kv_cache", kv_cache, FLOAT_DTYPES, ndim=5)
    check_same_dtype(qkv=qkv, kv_cache=kv_cache)
    if kv_cache.shape[1] != 2 or kv_cache.shape[4] % 2:
        raise ValueError("kv_cache must be [num_pages, 2, num_kv_heads, page_size, head_dim] with an even head_dim, "
                         f"got {tuple(kv_cache.shape)}")
    num_tokens, num_qo_heads, num_kv_heads, head_dim = _dims(qkv, kv_cache)
    if qkv.shape[1] % head_dim or num_qo_heads < 1:
        raise ValueError(f"qkv's width must be (num_qo_heads + 2 * {num_kv_heads}) * {head_dim} with num_qo_heads >= 1 "
                         f"(num_kv_heads and head_dim from kv_cache), got {qkv.shape[1]}")
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        check_tensor(name, t, INDEX_DTYPES, ndim=1)
        check_shape(name, t, (num_tokens,))
        check_last_dim_contiguous(name, t)
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, (torch.float32, qkv.dtype), ndim=2)
        if t.shape[1] != head_dim:
            raise ValueError(f"{name} must be [max_positions, {head_dim}], got {tuple(t.shape)}")
    check_shape("sin", sin, tuple(cos.shape))
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("give both q_norm_weight and k_norm_weight (Qwen3) or neither (Llama)")
    if q_norm_weight is not None:
        for name, t in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
            check_tensor(name, t, (qkv.dtype,), ndim=1)
            check_shape(name, t, (head_dim,))
            check_last_dim_contiguous(name, t)
    for name, t in (("qkv", qkv), ("cos", cos), ("sin", sin), ("kv_cache", kv_cache)):
        check_last_dim_contiguous(name, t)
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    norms = {"q_norm_weight": q_norm_weight, "k_norm_weight": k_norm_weight} if q_norm_weight is not None else {}
    check_devices(_qk_norm_rope_kernel, qkv=qkv, positions=positions, cos=cos, sin=sin, kv_cache=kv_cache,
                  slot_mapping=slot_mapping, **norms)
    return num_tokens, num_qo_heads, num_kv_heads, head_dim


@triton.jit
def _norm_weights(q_norm_ptr, k_norm_ptr, head, d, mask, NUM_QO_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The two halves of the norm weight of qkv head `head` as float32: q_norm's for a q head, k_norm's otherwise
    (a v head does not use it). Both are loaded and one is selected, bit for bit (a -0.0 weight stays -0.0)."""
    half: tl.constexpr = HEAD_DIM // 2
    is_q = head < NUM_QO_HEADS
    w1 = tl.where(is_q, tl.load(q_norm_ptr + d, mask=mask, other=0.0), tl.load(k_norm_ptr + d, mask=mask, other=0.0))
    w2 = tl.where(is_q, tl.load(q_norm_ptr + half + d, mask=mask, other=0.0),
                  tl.load(k_norm_ptr + half + d, mask=mask, other=0.0))
    return w1.to(tl.float32), w2.to(tl.float32)


@triton.jit
def _token_tables(positions_ptr, slot_mapping_ptr, cos_ptr, sin_ptr, token, cos_row_stride, sin_row_stride, d, mask,
                  HEAD_DIM: tl.constexpr):
    """(slot, cos1, cos2, sin1, sin2) of a token: its KV slot, and the halves of its rows of cos and sin as loaded
    (`_rounded` casts them as the model does)."""
    half: tl.constexpr = HEAD_DIM // 2
    position = tl.load(positions_ptr + token).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    cos_row, sin_row = cos_ptr + position * cos_row_stride, sin_ptr + position * sin_row_stride
    return (slot, tl.load(cos_row + d, mask=mask, other=0.0), tl.load(cos_row + half + d, mask=mask, other=0.0),
            tl.load(sin_row + d, mask=mask, other=0.0), tl.load(sin_row + half + d, mask=mask, other=0.0))


@triton.jit
def _rounded(table, dtype: tl.constexpr):
    """A half row of cos or sin cast to `dtype` (as the model casts them), as float32."""
    return round_to_dtype(table.to(tl.float32), dtype)


@triton.jit
def _norm_rope(src, w1, w2, cos1, cos2, sin1, sin2, d, mask, eps, dtype: tl.constexpr, HEAD_DIM: tl.constexpr,
               HAS_NORM: tl.constexpr, MEAN_BY_RECIPROCAL: tl.constexpr):
    """One head: RMSNorm by the weight halves w1, w2 (optional), then x * cos + rotate_half(x) * sin, each product
    and the sum rounded to `dtype` -> the two halves as float32 values of `dtype`."""
    half: tl.constexpr = HEAD_DIM // 2
    x1 = tl.load(src + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half + d, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        scale = rms_scale(tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0), HEAD_DIM, eps, MEAN_BY_RECIPROCAL)
        x1 = round_to_dtype(w1 * round_to_dtype(x1 * scale, dtype), dtype)
        x2 = round_to_dtype(w2 * round_to_dtype(x2 * scale, dtype), dtype)
    # rotate_half(x) = cat(-x2, x1)
    out1 = round_to_dtype(round_to_dtype(x1 * cos1, dtype) + round_to_dtype(-x2 * sin1, dtype), dtype)
    out2 = round_to_dtype(round_to_dtype(x2 * cos2, dtype) + round_to_dtype(x1 * sin2, dtype), dtype)
    return out1, out2


@triton.jit
def _qk_norm_rope_kernel(
    qkv_ptr, q_ptr, cache_ptr, positions_ptr, slot_mapping_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr,
    eps, qkv_row_stride, q_row_stride, cos_row_stride, sin_row_stride,
    cache_page_stride, cache_kv_stride, cache_head_stride, cache_slot_stride, page_size,
    NUM_QO_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr,
    HAS_QK_NORM: tl.constexpr, MEAN_BY_RECIPROCAL: tl.constexpr, NORM_FIRST: tl.constexpr,
    INDEX_FIRST: tl.constexpr, PDL: tl.constexpr,
):
    """Program (token, head) over qkv's heads in column order: q heads, then k heads, then v heads. With NORM_FIRST
    the norm weights, and with INDEX_FIRST the token's position, slot and cos / sin rows, are loaded before the PDL
    wait (inputs no kernel of the step writes), so that after it only the kernel ahead's qkv is read."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, HALF_BLOCK)
    mask = d < HEAD_DIM // 2
    if NORM_FIRST and HAS_QK_NORM:
        w1, w2 = _norm_weights(q_norm_ptr, k_norm_ptr, head, d, mask, NUM_QO_HEADS, HEAD_DIM)
    if INDEX_FIRST:
        slot, cos1, cos2, sin1, sin2 = _token_tables(positions_ptr, slot_mapping_ptr, cos_ptr, sin_ptr, token,
                                                     cos_row_stride, sin_row_stride, d, mask, HEAD_DIM)
    wait_for_inputs(PDL)
    release_dependents(PDL)  # the decode attention after this kernel reads its page tables meanwhile
    half: tl.constexpr = HEAD_DIM // 2
    dtype: tl.constexpr = q_ptr.dtype.element_ty
    if not (NORM_FIRST and HAS_QK_NORM):
        if HAS_QK_NORM:
            w1, w2 = _norm_weights(q_norm_ptr, k_norm_ptr, head, d, mask, NUM_QO_HEADS, HEAD_DIM)
        else:
            w1 = tl.zeros((HALF_BLOCK,), tl.float32)  # not read without the norm
            w2 = w1
    if not INDEX_FIRST:
        slot, cos1, cos2, sin1, sin2 = _token_tables(positions_ptr, slot_mapping_ptr, cos_ptr, sin_ptr, token,
                                                     cos_row_stride, sin_row_stride, d, mask, HEAD_DIM)
    cos1, cos2 = _rounded(cos1, dtype), _rounded(cos2, dtype)
    sin1, sin2 = _rounded(sin1, dtype), _rounded(sin2, dtype)
    src = qkv_ptr + token * qkv_row_stride + head * HEAD_DIM
    slot_base = cache_ptr + (slot // page_size) * cache_page_stride + (slot % page_size) * cache_slot_stride
    if head < NUM_QO_HEADS:
        out1, out2 = _norm_rope(src, w1, w2, cos1, cos2, sin1, sin2, d, mask, eps, dtype, HEAD_DIM, HAS_QK_NORM,
                                MEAN_BY_RECIPROCAL)
        dst = q_ptr + token * q_row_stride + head * HEAD_DIM
        tl.store(dst + d, out1.to(dtype), mask=mask)
        tl.store(dst + half + d, out2.to(dtype), mask=mask)
    elif slot >= 0:  # a padding token (negative slot) has no KV slot
        if head < NUM_QO_HEADS + NUM_KV_HEADS:
            out1, out2 = _norm_rope(src, w1, w2, cos1, cos2, sin1, sin2, d, mask, eps, dtype, HEAD_DIM, HAS_QK_NORM,
                                    MEAN_BY_RECIPROCAL)
            dst = slot_base + (head - NUM_QO_HEADS) * cache_head_stride  # keys: kv index 0
            tl.store(dst + d, out1.to(dtype), mask=mask)
            tl.store(dst + half + d, out2.to(dtype), mask=mask)
        else:
            dst = slot_base + cache_kv_stride + (head - NUM_QO_HEADS - NUM_KV_HEADS) * cache_head_stride  # values
            tl.store(dst + d, tl.load(src + d, mask=mask), mask=mask)
            tl.store(dst + half + d, tl.load(src + half + d, mask=mask), mask=mask)
