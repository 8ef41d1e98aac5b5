"""Paged decode attention (one query token per row) for small batches, flash-decoding style, in one kernel.

A batch-1 decode step has too little work per layer for one program per (row, KV head): 8 programs cannot pull 2 MB
from HBM in under a few microseconds. So each row's KV is cut into `num_splits` contiguous slices, one program per
(row, KV head, slice), each attending with all q heads of its GQA group (padded to 16 rows for tl.dot) and writing a
partial output and its log-sum-exp to a workspace. The last program of a (row, KV head) to finish, counted by an
atomic, merges the partials and resets the counter, so a step is one launch: no second merge kernel.

Slices are cut on the device from each row's KV length (at least `min_split_tokens` tokens each, so a short context
runs few programs and the rest return at once), so the grid depends only on the batch size: the launch is CUDA-graph
capturable once and replayable for any lengths. A row whose KV is one slice writes its output directly.

The reference gathers each row's pages and runs plain softmax attention in float32. The kernel multiplies by V on
tensor cores, whose inputs are bf16 (fp16): each softmax weight goes in as a high part plus its remainder (two
products), so it keeps ~16 bits and the output matches float32 attention, and FlashInfer's decode (float32 on CUDA
cores), to the output's rounding. Rounding the weights once to bf16, as prefill kernels do, moves about a third of
the outputs by one bf16 step, enough for a random-weight model's greedy tokens under CUDA graphs to part from eager
decode's (tests/gpu/test_cuda_graphs.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._checks import check_devices, check_last_dim_contiguous, check_same_dtype, check_shape, check_tensor
from .int8_rows import Int8Rows, check_int8_rows, store_int8_runs
from .numerics import INTERPRETED, launch_options, pdl_options, release_dependents, round_to_dtype, wait_for_inputs

KV_DTYPES = (torch.float16, torch.bfloat16)
MIN_SPLIT_TOKENS = 32  # fewest KV tokens a slice gets: below it, a program's fixed latency outweighs its reads
MIN_SPLITS, MAX_SPLITS = 8, 128


def decode_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                         kv_last_page_len: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain float32 softmax attention over each row's gathered pages; same arguments as `decode_attention`."""
    num_rows, num_qo_heads, _ = q.shape
    _, _, num_kv_heads, page_size, _ = kv_cache.shape
    out = torch.empty_like(q)
    for row in range(num_rows):
        pages = kv_indices[kv_indptr[row] : kv_indptr[row + 1]].long()
        kv_len = (len(pages) - 1) * page_size + int(kv_last_page_len[row]) if len(pages) else 0
        kv = kv_cache[pages].permute(1, 2, 0, 3, 4).flatten(2, 3)[:, :, :kv_len].float()  # (2, kvh, L, hd)
        k = kv[0].repeat_interleave(num_qo_heads // num_kv_heads, dim=0)  # (qh, L, hd)
        v = kv[1].repeat_interleave(num_qo_heads // num_kv_heads, dim=0)  # (qh, L, hd)
        scores = torch.einsum("hd,hld->hl", q[row].float(), k) * scale  # (qh, L)
        out[row] = torch.einsum("hl,hld->hd", scores.softmax(dim=-1), v).to(q.dtype) if kv_len else 0
    return out


def default_num_splits(num_rows: int, num_kv_heads: int, head_dim: int, num_sms: int,
                       max_kv_len: int | None = None) -> int:
    """Slices per (row, KV head) for a launch whose grid must serve every length up to max_kv_len (None: any).

    Measured on an H100 (benchmarks/decode_attention.py --sweep): at long contexts the best grid has about two
    programs per SM at head_dim 128 and four at 64 (half the bytes per token: more programs to cover the latency);
    at short contexts more, shorter slices than that win (so at least MIN_SPLITS); the largest power of two within
    that, and no more than max_kv_len can fill."""
    programs = 2 * num_sms * max(1, 128 // head_dim)
    splits = 1 << max(0, (programs // max(1, num_rows * num_kv_heads)).bit_length() - 1)
    splits = min(max(splits, MIN_SPLITS), MAX_SPLITS)
    if max_kv_len is not None:
        splits = min(splits, triton.next_power_of_2(max(1, -(-max_kv_len // MIN_SPLIT_TOKENS))))
    return splits


def default_block_n(head_dim: int) -> int:
    """KV tokens per loop iteration: 64 up to head_dim 128 (at 128, 64 beat 32 by 5-10% at 4k-16k tokens)."""
    return 64 if head_dim <= 128 else 32


def default_num_warps(num_splits: int, head_dim: int) -> int:
    """2 warps stream the KV fastest at head_dim 64; 4 from head_dim 128 (one row of the Llama-3.1-8B layout, 32 q / 8
    KV heads, on an H100: 7.3 against 7.9 us at 384 tokens, 7.6 against 8.6 at 1k, 14.7 against 15.3 at 4k, with
    num_stages 2) and wherever num_splits * head_dim > 4096 (the bound was set for a merge that held a [num_splits,
    head_dim] float32 tile a head, which would have needed more than 64 registers a thread at 2 warps; kept as
    measured)."""
    return 2 if num_splits * head_dim <= 4096 and head_dim < 128 else 4


MERGE_SPLITS = 8  # slices whose partials' loads the merge issues together, one unrolled step (a short context's all)
MERGE_TILE = 4096  # at most this many float32 partials per unrolled step (8 slices of a group of 4 heads of 128,
# as measured): larger groups take fewer slices a step rather than more registers
KV_PREFETCH = True  # with tables_ready: L2 fetches each slice's first block of keys and values before the wait
NUM_STAGES = 2  # software-pipelining depth of the KV loop: 2 beat Triton's default 3 by 4-6% in that sweep


def merge_step(group: int, head_dim: int, num_splits: int) -> int:
    """Slices the merge loads in one unrolled step: MERGE_SPLITS, fewer where the group's (heads, head_dim) tiles
    would hold more than MERGE_TILE partials a step, and no more than there are slices (all powers of two)."""
    per_slice = triton.next_power_of_2(group) * head_dim
    return max(1, min(MERGE_SPLITS, num_splits, MERGE_TILE // per_slice))


@dataclass(frozen=True)
class DecodeWorkspace:
    """Scratch for the split-KV partials of launches of up to `max_rows` rows; allocate once, reuse every launch
    (one launch at a time: a launch leaves the arrival counters at zero for the next)."""

    partial_out: torch.Tensor  # [max_rows, num_qo_heads, num_splits, head_dim] float32, each slice's output
    partial_lse: torch.Tensor  # [max_rows, num_qo_heads, num_splits] float32, its log2-sum-exp2 of scaled scores
    arrivals: torch.Tensor  # [max_rows, num_kv_heads] int32, slices finished so far; zero between launches

    @classmethod
    def allocate(cls, max_rows: int, num_qo_heads: int, num_kv_heads: int, head_dim: int, num_splits: int,
                 device: torch.device | str) -> DecodeWorkspace:
        """Buffers for launches of up to max_rows rows cutting each row's KV into num_splits slices (a power of
        two); the arrival counters start at zero and every launch leaves them there."""
        if not _is_power_of_two(num_splits):
            raise ValueError(f"num_splits must be a power of two, got {num_splits}")
        f32 = dict(dtype=torch.float32, device=device)
        return cls(torch.empty(max_rows, num_qo_heads, num_splits, head_dim, **f32),
                   torch.empty(max_rows, num_qo_heads, num_splits, **f32),
                   torch.zeros(max_rows, num_kv_heads, dtype=torch.int32, device=device))

    @property
    def num_splits(self) -> int:
        """Slices per row (the launch grid's last dimension)."""
        return self.partial_lse.shape[2]


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                     kv_last_page_len: torch.Tensor, scale: float, workspace: DecodeWorkspace | None = None,
                     min_split_tokens: int = MIN_SPLIT_TOKENS, block_n: int | None = None,
                     num_warps: int | None = None, int8: Int8Rows | None = None,
                     tables_ready: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale) v for one new token per row over its paged KV -> out [num_rows, num_qo_heads, head_dim].

    q: [num_rows, num_qo_heads, head_dim], float16/bfloat16, head_dim a power of two in [16, 256]; q head h attends
        with KV head h // (num_qo_heads // num_kv_heads).
    kv_cache: one layer's pool [num_pages, 2, num_kv_heads, page_size, head_dim] (HND; 0: keys, 1: values), q's
        dtype, page_size a power of two.
    kv_indptr: [num_rows + 1] int32; row i's pages are kv_indices[kv_indptr[i]:kv_indptr[i + 1]] (FlashInfer's CSR).
    kv_indices: [>= kv_indptr[-1]] int32 page numbers.
    kv_last_page_len: [num_rows] int32 in [1, page_size], tokens in each row's last page (a row with no pages gets 0).
    scale: softmax scale, usually head_dim ** -0.5.
    workspace: partials and counters for num_rows rows or more; None allocates one (not for graph capture, whose
        replays must find its counters at zero: allocate it outside and reuse it).
    min_split_tokens, block_n, num_warps: tuning (see benchmarks/decode_attention.py); None: the defaults above.
    int8: optional Int8Rows of [num_rows, num_qo_heads * head_dim] (int8_rows.empty_int8_rows) that the kernel also
        writes the output into, rounded to int8 runs exactly as quantize_rows(out.flatten(1)) would: the input of
        the integer-dot GEMV of the projection after attention, without a launch of its own.
    tables_ready: kv_indptr, kv_indices and kv_last_page_len were not written by a kernel of this launch's stream
        that may still be running (e.g. they were copied from the host before a graph replay): under programmatic
        dependent launch the kernel then reads them before waiting for the kernel ahead, and asks L2 for the first
        keys and values of its slices meanwhile (KV_PREFETCH).
    Page numbers and lengths are not range checked (that would synchronise with the GPU).
    """
    num_rows, num_qo_heads, head_dim = _check(q, kv_cache, kv_indptr, kv_indices, kv_last_page_len, scale, workspace,
                                              min_split_tokens, block_n, int8)
    block_n = default_block_n(head_dim) if block_n is None else block_n
    num_kv_heads, page_size = kv_cache.shape[2], kv_cache.shape[3]
    if workspace is None:
        splits = default_num_splits(num_rows, num_kv_heads, head_dim, _num_sms(q.device))
        workspace = DecodeWorkspace.allocate(num_rows, num_qo_heads, num_kv_heads, head_dim, splits, q.device)
    num_warps = default_num_warps(workspace.num_splits, head_dim) if num_warps is None else num_warps
    out = torch.empty((num_rows, num_qo_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_rows == 0:
        return out
    group = num_qo_heads // num_kv_heads
    # The int8 rounding reproduces quantize_rows' only without mul+add contraction (launch_options); the plain
    # launch keeps the contraction its float arithmetic was measured with.
    options = launch_options(q) if int8 is not None else pdl_options(q)
    # 128-byte lines of a key (value) row that L2 fetches before the wait; 0: none
    row_bytes = head_dim * kv_cache.element_size()
    prefetches = KV_PREFETCH and tables_ready and options.get("PDL", False) and torch.version.hip is None
    kv_lines = row_bytes // 128 if prefetches and row_bytes >= 128 else 0
    _decode_kernel[(num_rows, num_kv_heads, workspace.num_splits)](
        q, kv_cache, kv_indptr, kv_indices, kv_last_page_len, out,
        workspace.partial_out, workspace.partial_lse, workspace.arrivals,
        *(int8[:3] if int8 is not None else (None, None, None)),
        float(scale) * math.log2(math.e), min_split_tokens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *kv_cache.stride()[:4],
        NUM_QO_HEADS=num_qo_heads, NUM_KV_HEADS=num_kv_heads, GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, PAGE_SIZE=page_size, BLOCK_N=block_n,
        GROUP_P2=triton.next_power_of_2(group), MERGE_STEP=merge_step(group, head_dim, workspace.num_splits),
        NUM_SPLITS=workspace.num_splits, INT8=int8 is not None, TABLES_FIRST=tables_ready, KV_LINES=kv_lines,
        num_warps=num_warps, num_stages=NUM_STAGES,
        **options,
    )
    return out


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


def _check(q, kv_cache, kv_indptr, kv_indices, kv_last_page_len, scale, workspace, min_split_tokens, block_n,
           int8=None):
    check_tensor("q", q, KV_DTYPES, ndim=3)
    check_tensor("kv_cache", kv_cache, KV_DTYPES, ndim=5)
    check_same_dtype(q=q, kv_cache=kv_cache)
    num_rows, num_qo_heads, head_dim = q.shape
    _, two, num_kv_heads, page_size, cache_head_dim = kv_cache.shape
    if two != 2 or cache_head_dim != head_dim or not _is_power_of_two(page_size):
        raise ValueError(f"kv_cache must be [num_pages, 2, num_kv_heads, page_size, {head_dim}] (q's head_dim) with "
                         f"page_size a power of two, got {tuple(kv_cache.shape)}")
    if not _is_power_of_two(head_dim) or not 16 <= head_dim <= 256:
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {head_dim}")
    if num_kv_heads < 1 or num_qo_heads % num_kv_heads:
        raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    for name, t, shape in (("kv_indptr", kv_indptr, (num_rows + 1,)), ("kv_indices", kv_indices, None),
                           ("kv_last_page_len", kv_last_page_len, (num_rows,))):
        check_tensor(name, t, (torch.int32,), ndim=1)
        if shape is not None:
            check_shape(name, t, shape)
        check_last_dim_contiguous(name, t)
    check_last_dim_contiguous("q", q)
    check_last_dim_contiguous("kv_cache", kv_cache)
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    if block_n is not None and (not _is_power_of_two(block_n) or block_n < 16):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    if not isinstance(min_split_tokens, int) or min_split_tokens < 1:
        raise ValueError(f"min_split_tokens must be a positive int, got {min_split_tokens!r}")
    tensors = dict(q=q, kv_cache=kv_cache, kv_indptr=kv_indptr, kv_indices=kv_indices,
                   kv_last_page_len=kv_last_page_len)
    if workspace is not None:
        max_rows, heads, _, dim = workspace.partial_out.shape
        if max_rows < num_rows or heads != num_qo_heads or dim != head_dim or (
                tuple(workspace.arrivals.shape) != (max_rows, num_kv_heads)):
            raise ValueError(f"workspace is for {max_rows} rows of {heads} q heads, {workspace.arrivals.shape[1]} KV "
                             f"heads, head_dim {dim}; the launch has {num_rows} rows of {num_qo_heads}, "
                             f"{num_kv_heads}, {head_dim}")
        tensors.update(partial_out=workspace.partial_out, partial_lse=workspace.partial_lse,
                       arrivals=workspace.arrivals)
    if int8 is not None:
        if not isinstance(int8, Int8Rows):
            raise TypeError(f"int8 must be an Int8Rows (int8_rows.empty_int8_rows), got {type(int8).__name__}")
        if head_dim < 32:
            raise ValueError(f"int8 output needs head_dim >= 32 (whole runs of 32 columns per head), got {head_dim}")
        if int8.dtype != q.dtype:
            raise ValueError(f"int8 rows must be made for q's dtype {q.dtype} (their products' dtype), got "
                             f"{int8.dtype}")
        check_int8_rows("int8", int8, num_rows, num_qo_heads * head_dim)
        tensors.update(int8_q=int8.q, int8_dx=int8.dx, int8_sx=int8.sx)
    check_devices(_decode_kernel, **tensors)
    return num_rows, num_qo_heads, head_dim


@triton.jit
def _dot(a, b, acc):
    """acc + a @ b, accumulated in float32; the interpreter (Triton 3.9) multiplies bf16 tiles as raw integers, so
    there they are widened first."""
    if INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _prefetch(ptrs):
    """Asks L2 for the 128-byte line holding each address of the pointer tensor ptrs, with no eviction priority of
    its own; loads nothing into registers (CUDA only: inline PTX)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _prefetch_first_block(cache_ptr, kv_indices_ptr, page_start, start, kv_len, kv_head, cache_page_stride,
                          cache_kv_stride, cache_head_stride, cache_slot_stride, HEAD_DIM: tl.constexpr,
                          PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, KV_LINES: tl.constexpr):
    """Asks L2 for the keys and values of the BLOCK_N tokens from `start` of a row's KV (those below kv_len; the
    others ask for page 0's lines, which every pool has), KV_LINES 128-byte lines a token and head."""
    t0 = start + tl.arange(0, BLOCK_N)
    page0 = tl.load(kv_indices_ptr + page_start + t0 // PAGE_SIZE, mask=t0 < kv_len, other=0).to(tl.int64)
    slot0 = page0 * cache_page_stride + (t0 % PAGE_SIZE) * cache_slot_stride  # (N,)
    line = tl.arange(0, KV_LINES) * (HEAD_DIM // KV_LINES)  # (L,) the first column of each 128-byte line
    k_base = cache_ptr + kv_head.to(tl.int64) * cache_head_stride
    _prefetch(k_base + slot0[:, None] + line[None, :])
    _prefetch(k_base + cache_kv_stride + slot0[:, None] + line[None, :])


@triton.jit
def _row_slices(kv_indptr_ptr, kv_last_page_len_ptr, min_split_tokens, PAGE_SIZE: tl.constexpr,
                BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """(first page, KV length, slice length, slices with tokens) of this program's row: slices of kv_len /
    NUM_SPLITS tokens, at least min_split_tokens, rounded up to whole blocks; at least one slice."""
    row = tl.program_id(0)
    page_start = tl.load(kv_indptr_ptr + row)
    num_pages = tl.load(kv_indptr_ptr + row + 1) - page_start
    kv_len = tl.where(num_pages > 0, (num_pages - 1) * PAGE_SIZE + tl.load(kv_last_page_len_ptr + row), 0)
    chunk = tl.maximum(tl.cdiv(kv_len, NUM_SPLITS), min_split_tokens)
    chunk = tl.cdiv(chunk, BLOCK_N) * BLOCK_N
    return page_start, kv_len, chunk, tl.maximum(tl.cdiv(kv_len, chunk), 1)


@triton.jit
def _decode_kernel(
    q_ptr, cache_ptr, kv_indptr_ptr, kv_indices_ptr, kv_last_page_len_ptr, out_ptr,
    partial_out_ptr, partial_lse_ptr, arrivals_ptr, q8_ptr, dx_ptr, sx_ptr,
    qk_scale, min_split_tokens,
    q_row_stride, q_head_stride, out_row_stride, out_head_stride,
    cache_page_stride, cache_kv_stride, cache_head_stride, cache_slot_stride,
    NUM_QO_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    GROUP_P2: tl.constexpr, MERGE_STEP: tl.constexpr, INT8: tl.constexpr, TABLES_FIRST: tl.constexpr,
    KV_LINES: tl.constexpr, PDL: tl.constexpr,
):
    """Program (row, KV head, slice): the GROUP q heads of the KV head over the slice's tokens, in the log2 domain
    (qk_scale = scale * log2(e)); with INT8 the output is also written as int8 runs (q8, dx, sx). With TABLES_FIRST
    the row's page-table entries are read before the PDL wait, and with KV_LINES (128-byte lines a key row) L2 is
    asked for the slice's first block of keys and values then (a hint: the newest token's, which the kernel ahead
    writes, are loaded after the wait as every other)."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if TABLES_FIRST:  # tables no kernel of the step writes: read while the kernel ahead still runs
        page_start, kv_len, chunk, num_active = _row_slices(kv_indptr_ptr, kv_last_page_len_ptr, min_split_tokens,
                                                            PAGE_SIZE, BLOCK_N, NUM_SPLITS)
        if KV_LINES > 0:  # and L2 fetches the slice's first block of keys and values meanwhile
            if split < num_active:
                _prefetch_first_block(cache_ptr, kv_indices_ptr, page_start, split * chunk, kv_len, kv_head,
                                      cache_page_stride, cache_kv_stride, cache_head_stride, cache_slot_stride,
                                      HEAD_DIM, PAGE_SIZE, BLOCK_N, KV_LINES)
    wait_for_inputs(PDL)
    release_dependents(PDL)  # the kernel after it (o_proj's GEMV where it writes int8 rows) starts on its weights
    d = tl.arange(0, HEAD_DIM)
    n = tl.arange(0, BLOCK_N)
    k_base = cache_ptr + kv_head.to(tl.int64) * cache_head_stride
    v_base = k_base + cache_kv_stride
    if not TABLES_FIRST:
        page_start, kv_len, chunk, num_active = _row_slices(kv_indptr_ptr, kv_last_page_len_ptr, min_split_tokens,
                                                            PAGE_SIZE, BLOCK_N, NUM_SPLITS)
    if split < num_active:
        g = tl.arange(0, GROUP_PAD)
        head = kv_head * GROUP + g  # (G,) q heads of this KV head
        g_mask = g < GROUP
        q = tl.load(q_ptr + row.to(tl.int64) * q_row_stride + head[:, None] * q_head_stride + d[None, :],
                    mask=g_mask[:, None], other=0.0)  # (G, D)
        start = split * chunk
        end = tl.minimum(start + chunk, kv_len)
        m_i = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
        l_i = tl.zeros((GROUP_PAD,), tl.float32)
        acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
        for block in range(start, end, BLOCK_N):  # every block holds at least one token of the slice
            t = block + n  # (N,) token positions in the row's KV
            t_mask = t < end
            page = tl.load(kv_indices_ptr + page_start + t // PAGE_SIZE, mask=t_mask, other=0).to(tl.int64)
            slot = page * cache_page_stride + (t % PAGE_SIZE) * cache_slot_stride  # (N,)
            k = tl.load(k_base + slot[:, None] + d[None, :], mask=t_mask[:, None], other=0.0)  # (N, D)
            v = tl.load(v_base + slot[:, None] + d[None, :], mask=t_mask[:, None], other=0.0)  # (N, D)
            s = _dot(q, tl.trans(k), tl.zeros((GROUP_PAD, BLOCK_N), tl.float32)) * qk_scale  # (G, N)
            s = tl.where(t_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            # p as a bf16 (fp16) high part plus its remainder: two tensor-core products keep ~16 bits of each weight
            p_hi = p.to(v.dtype)
            p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
            acc = _dot(p_lo, v, _dot(p_hi, v, acc * alpha[:, None]))
            m_i = m_new
        dtype: tl.constexpr = out_ptr.dtype.element_ty
        out_rows = out_ptr + row.to(tl.int64) * out_row_stride + head[:, None] * out_head_stride + d[None, :]
        if num_active == 1:
            out = round_to_dtype(acc / tl.where(l_i > 0, l_i, 1.0)[:, None], dtype)  # a row without KV gets zeros
            tl.store(out_rows, out.to(dtype), mask=g_mask[:, None])
            if INT8:
                for i in tl.static_range(GROUP):  # head i of the group: row i of out
                    _store_head_int8(tl.sum(tl.where(g[:, None] == i, out, 0.0), axis=0), q8_ptr, dx_ptr, sx_ptr,
                                     row, kv_head * GROUP + i, NUM_QO_HEADS, HEAD_DIM)
        else:
            partial = (row * NUM_QO_HEADS + head) * NUM_SPLITS  # (G,) each head's first slice
            tl.store(partial_out_ptr + (partial + split)[:, None] * HEAD_DIM + d[None, :], acc / l_i[:, None],
                     mask=g_mask[:, None])
            tl.store(partial_lse_ptr + partial + split, m_i + tl.log2(l_i), mask=g_mask)
            tl.debug_barrier()  # every thread's partial is written before the release below publishes them
            arrived = tl.atomic_add(arrivals_ptr + row * NUM_KV_HEADS + kv_head, 1, sem="acq_rel")
            if arrived == num_active - 1:  # the last slice to finish merges them all
                tl.store(arrivals_ptr + row * NUM_KV_HEADS + kv_head, 0)  # ready for the next launch
                _merge(partial_out_ptr, partial_lse_ptr, out_ptr, q8_ptr, dx_ptr, sx_ptr, row, kv_head, num_active,
                       out_row_stride, out_head_stride, NUM_QO_HEADS, GROUP, GROUP_P2, HEAD_DIM, NUM_SPLITS,
                       MERGE_STEP, INT8)


@triton.jit
def _store_head_int8(out, q8_ptr, dx_ptr, sx_ptr, row, head, NUM_QO_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One head's output (HEAD_DIM,) float32, already rounded to the output dtype, as the int8 runs of its columns
    [head * HEAD_DIM, (head + 1) * HEAD_DIM) of the row."""
    runs: tl.constexpr = HEAD_DIM // 32
    store_int8_runs(tl.reshape(out, (runs, 32)), row, head * runs, q8_ptr, dx_ptr, sx_ptr, NUM_QO_HEADS * HEAD_DIM,
                    runs)


@triton.jit
def _merge(partial_out_ptr, partial_lse_ptr, out_ptr, q8_ptr, dx_ptr, sx_ptr, row, kv_head, num_active,
           out_row_stride, out_head_stride, NUM_QO_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
           HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, STEP: tl.constexpr, INT8: tl.constexpr):
    """out = sum over slices of exp2(lse_s - lse) * out_s for each q head of the group (and its int8 runs with
    INT8). The group's heads (GROUP_P2: GROUP rounded up to a power of two) are merged together, slice by slice with
    a running maximum (as the attention loop runs over blocks), STEP slices unrolled at a time: their loads do not
    wait for one another (a short context's slices are one step). Each slice's lse is loaded as a (G,) vector, and the
    running maximum, weights and sums are (G,) vectors broadcast across D onto the (G, D) partials: Triton loads and
    keeps them in the slice layout of those tiles, so no value moves between threads. (The lse loaded as a (G, D)
    tile whose pointers repeat along D got a layout of its own, and each slice then cost three layout conversions
    through shared memory. The one-row graph launch of the 8B layouts compiled for sm_90 by Triton 3.6, int8 output:
    269 barriers and 6,000 SASS instructions then, 77 and 4,168 now; benchmarks/kernel_sass.py.) Loads bypass
    L1 (.cg): the partials were written by other SMs during this launch."""
    g = tl.arange(0, GROUP_P2)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g  # (G,)
    g_mask = g < GROUP
    first_partial = (row * NUM_QO_HEADS + heads) * NUM_SPLITS  # (G,) each head's first slice
    m = tl.full((GROUP_P2,), float("-inf"), tl.float32)  # the largest lse so far
    total = tl.zeros((GROUP_P2,), tl.float32)  # sum of exp2(lse_s - m)
    acc = tl.zeros((GROUP_P2, HEAD_DIM), tl.float32)  # sum of exp2(lse_s - m) * out_s
    for first in tl.static_range(0, NUM_SPLITS, STEP):
        if first < num_active:
            for c in tl.static_range(STEP):
                partial = first_partial + first + c  # (G,)
                mask = g_mask & (g * 0 + first + c < num_active)  # (G,) (a vector: the interpreter)
                lse = tl.load(partial_lse_ptr + partial, mask=mask, other=float("-inf"), cache_modifier=".cg")  # (G,)
                o = tl.load(partial_out_ptr + partial[:, None] * HEAD_DIM + d[None, :], mask=mask[:, None],
                            other=0.0, cache_modifier=".cg")  # (G, D)
                m_new = tl.maximum(m, lse)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf where nothing arrived yet
                alpha = tl.exp2(m - m_safe)
                w = tl.exp2(lse - m_safe)
                total = total * alpha + w
                acc = acc * alpha[:, None] + w[:, None] * o
                m = m_new
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    out = round_to_dtype(acc / tl.where(g_mask, total, 1.0)[:, None], dtype)  # (G, D)
    tl.store(out_ptr + row.to(tl.int64) * out_row_stride + heads[:, None] * out_head_stride + d[None, :],
             out.to(dtype), mask=g_mask[:, None])  # to nearest also when interpreted (see kernels.numerics)
    if INT8:
        if GROUP == GROUP_P2:  # the group's heads are whole rows of out: its columns' runs in one tile
            runs: tl.constexpr = GROUP * HEAD_DIM // 32
            store_int8_runs(tl.reshape(out, (runs, 32)), row, kv_head * runs, q8_ptr, dx_ptr, sx_ptr,
                            NUM_QO_HEADS * HEAD_DIM, runs)
        else:
            for i in tl.static_range(GROUP):  # head i of the group: row i of out
                _store_head_int8(tl.sum(tl.where(g[:, None] == i, out, 0.0), axis=0), q8_ptr, dx_ptr, sx_ptr, row,
                                 kv_head * GROUP + i, NUM_QO_HEADS, HEAD_DIM)
