"""decode_attention against its float32 reference: on the CPU through the interpreter at small shapes (rows of 1 token,
of several pages, with a partial last page; GQA groups of 1 to 16; slices left empty; merges of one, two and four
steps), on the GPU at Qwen3-0.6B, SmolLM2-135M and Qwen2.5-7B head layouts up to 16k tokens, and replayed inside a
CUDA graph with the lengths changed in between.

The kernel's output is rounded to bf16, the reference's is float32, so each (row, head) output vector agrees with the
reference to a bf16 step of itself (relative error ~2e-3). An absolute tolerance cannot tell that from a bug at long
rows: attention over random KV averages V, so the output shrinks as 1/sqrt(tokens) (std ~0.013 at 16k) and a lost
split or a wrong page moves it by less than 2e-2. The comparison is therefore relative to each vector's norm
(tests/support/numerics.py), and test_attention_check_* show, at the GPU shapes and on the CPU, that it rejects a
reference computed without the last 1/16 or 1/8 of each row's KV, or with one wrong page per row."""
from __future__ import annotations

import pytest
import torch

from braid_kernels.decode_attention import DecodeWorkspace, decode_attention, decode_attention_ref, merge_step
from braid_kernels.int8_rows import empty_int8_rows, quantize_rows
from tests.support.numerics import ATTENTION_REL_TOL, assert_attention_close, relative_errors


def _inputs(lengths, num_qo_heads, num_kv_heads, head_dim, page_size, device, dtype=torch.bfloat16, seed=0,
            spare_pages=3):
    """q, a random pool, and CSR page tables over a random permutation of its pages for rows of `lengths` tokens."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // page_size) for n in lengths]
    num_pages = sum(need) + spare_pages
    pool = torch.randn(num_pages, 2, num_kv_heads, page_size, head_dim, generator=g).to(dtype).to(device)
    q = torch.randn(len(lengths), num_qo_heads, head_dim, generator=g).to(dtype).to(device)
    indices = torch.randperm(num_pages, generator=g)[: sum(need)]
    indptr = torch.tensor([0, *need]).cumsum(0)
    last = torch.tensor([n - (p - 1) * page_size if p else 0 for n, p in zip(lengths, need)])
    tables = [t.to(torch.int32).to(device) for t in (indptr, indices, last)]
    return q, pool, tables


def _check(q, pool, tables, out):
    ref = decode_attention_ref(q.float(), pool.float(), *tables, q.shape[-1] ** -0.5)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_attention_close(out, ref)


CPU_CASES = {  # name: (lengths, num_qo_heads, num_kv_heads, page_size, num_splits, min_split_tokens)
    "gqa2-splits": ([1, 5, 37, 64], 4, 2, 4, 4, 8),
    "gqa3-splits": ([1, 70, 16, 33], 6, 2, 4, 4, 8),
    "gqa1-one-slice-each": ([9, 1, 50], 2, 2, 8, 2, 64),
    "gqa8-page16": ([100, 3], 8, 1, 16, 8, 16),
    "more-slices-than-tokens": ([2, 17], 4, 2, 4, 16, 1),
    "merged-in-two-steps": ([200, 45], 6, 2, 4, 16, 8),  # 13 slices of 16 tokens: more than a merge step takes
    "gqa1-merged": ([200, 45], 2, 2, 4, 16, 8),
    "gqa16-merged-in-four-steps": ([200, 45], 16, 1, 4, 16, 8),  # 16 x 64 partials a slice: 4 slices a step
}


def test_merge_step_keeps_the_measured_tile():
    """Eight slices a step for a group of 4 heads of 128 (the Llama/Qwen3-8B layouts it was measured at); larger
    groups fewer, never more slices than there are."""
    assert merge_step(4, 128, 32) == 8
    assert merge_step(8, 128, 32) == 4  # Qwen2.5-7B's group of 7 rounds up to 8
    assert merge_step(16, 64, 16) == 4
    assert merge_step(3, 64, 4) == 4
    assert merge_step(32, 256, 128) == 1


@pytest.mark.parametrize("tables_ready", [False, True])
@pytest.mark.parametrize("case", sorted(CPU_CASES))
def test_matches_reference(device, case, tables_ready):
    lengths, num_qo, num_kv, page_size, splits, min_split = CPU_CASES[case]
    q, pool, tables = _inputs(lengths, num_qo, num_kv, 64, page_size, device, seed=len(case))
    ws = DecodeWorkspace.allocate(len(lengths), num_qo, num_kv, 64, splits, device)
    out = decode_attention(q, pool, *tables, 64**-0.5, workspace=ws, min_split_tokens=min_split, block_n=16,
                           tables_ready=tables_ready)
    _check(q, pool, tables, out)
    assert not ws.arrivals.any(), "a launch must leave the arrival counters at zero"
    # The same workspace again (as a graph replay would use it), other lengths.
    q, pool, tables = _inputs(lengths[::-1], num_qo, num_kv, 64, page_size, device, seed=len(case) + 1)
    _check(q, pool, tables, decode_attention(q, pool, *tables, 64**-0.5, workspace=ws, min_split_tokens=min_split,
                                             block_n=16, tables_ready=tables_ready))


def test_output_is_float32_attention_rounded_once(device):
    """The softmax weights keep ~16 bits through the bf16 products with V (see the kernel's docstring): nearly every
    output is the float32 result rounded to bf16. Weights rounded to bf16 move about a third of them."""
    q, pool, tables = _inputs([1, 37, 200], 6, 2, 64, 4, device, seed=3)
    ws = DecodeWorkspace.allocate(3, 6, 2, 64, 4, device)
    out = decode_attention(q, pool, *tables, 64**-0.5, workspace=ws, block_n=16)
    ref = decode_attention_ref(q.float(), pool.float(), *tables, 64**-0.5).to(q.dtype)
    assert (out != ref).float().mean() < 0.02


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_default_workspace_and_dtypes(device, dtype):
    q, pool, tables = _inputs([3, 40], 4, 2, 64, 8, device, dtype=dtype)
    _check(q, pool, tables, decode_attention(q, pool, *tables, 64**-0.5, min_split_tokens=16, block_n=16))


def test_a_row_without_pages_gets_zeros(device):
    q, pool, tables = _inputs([0, 5], 4, 2, 64, 4, device)
    out = decode_attention(q, pool, *tables, 64**-0.5, block_n=16)
    assert not out[0].any()
    _check(q[1:], pool, [tables[0][1:] - tables[0][1], tables[1], tables[2][1:]], out[1:])


@pytest.mark.parametrize("tables_ready", [False, True])  # graph decodes write int8 rows with tables_ready
@pytest.mark.parametrize("num_qo_heads", [6, 8])  # GQA groups of 3 heads (head by head) and of 4 (one tile)
@pytest.mark.parametrize("lengths, num_splits", [([1, 5, 37, 64, 0], 4), ([40], 4), ([200, 45], 16)])
def test_int8_output_is_quantize_rows_of_the_output(device, lengths, num_splits, num_qo_heads, tables_ready):
    """With `int8`, the kernel also writes its output as int8 runs: byte for byte what quantize_rows makes of the
    output it returns (merged heads and one-slice heads alike, every head of a GQA group), and that output still
    matches the reference. A head written into another head's runs, or a run rounded differently, fails this."""
    q, pool, tables = _inputs(lengths, num_qo_heads, 2, 64, 4, device, seed=5)
    ws = DecodeWorkspace.allocate(len(lengths), num_qo_heads, 2, 64, num_splits, device)
    rows = empty_int8_rows(len(lengths), num_qo_heads * 64, q.dtype, device)
    for t in rows[:3]:
        t.fill_(7)  # stale values: every byte must be written
    out = decode_attention(q, pool, *tables, 64**-0.5, workspace=ws, min_split_tokens=8, block_n=16, int8=rows,
                           tables_ready=tables_ready)
    if lengths[-1] == 0:
        assert not out[-1].any()
        _check(q[:-1], pool, [tables[0][:-1], tables[1], tables[2][:-1]], out[:-1])
    else:
        _check(q, pool, tables, out)
    want = quantize_rows(out.flatten(1))
    assert torch.equal(rows.q, want.q)
    assert torch.equal(rows.dx, want.dx) and torch.equal(rows.sx, want.sx)
    assert rows.q.abs().amax() == 127  # not all zeros: the runs hold the output


def test_int8_output_arguments_are_checked(device):
    q, pool, tables = _inputs([3, 9], 4, 2, 64, 4, device)
    with pytest.raises(ValueError, match="int8.q must have shape"):
        decode_attention(q, pool, *tables, 0.125, int8=empty_int8_rows(2, 128, q.dtype, device))
    with pytest.raises(TypeError, match="int8 must be an Int8Rows"):
        decode_attention(q, pool, *tables, 0.125, int8=torch.zeros(2, 256, dtype=torch.int8, device=device))


def test_no_rows(device):
    q, pool, tables = _inputs([1], 4, 2, 64, 4, device)
    out = decode_attention(q[:0], pool, tables[0][:1], tables[1], tables[2][:0], 0.125)
    assert out.shape == (0, 4, 64)


_BAD = {
    "q dtype": (lambda a: a.update(q=a["q"].float()), "q must have dtype"),
    "pool dtype": (lambda a: a.update(kv_cache=a["kv_cache"].half()), "dtypes must match"),
    "pool layout": (lambda a: a.update(kv_cache=a["kv_cache"][:, :1]), r"\[num_pages, 2, num_kv_heads"),
    "page size": (lambda a: a.update(kv_cache=a["kv_cache"][:, :, :, :3]), "page_size a power of two"),
    "head_dim": (lambda a: a.update(q=a["q"][..., :48], kv_cache=a["kv_cache"][..., :48]), "head_dim must be"),
    "heads": (lambda a: a.update(q=a["q"][:, :3]), "multiple of num_kv_heads"),
    "indptr length": (lambda a: a.update(kv_indptr=a["kv_indptr"][:-1]), "kv_indptr must have shape"),
    "int64 indices": (lambda a: a.update(kv_indices=a["kv_indices"].long()), "kv_indices must have dtype"),
    "strided last_page_len": (lambda a: a.update(kv_last_page_len=a["kv_last_page_len"].repeat_interleave(2)[::2]),
                              "kv_last_page_len must be contiguous"),
    "scale": (lambda a: a.update(scale=0.0), "scale must be"),
    "block_n": (lambda a: a.update(block_n=8), "block_n must be"),
    "workspace heads": (lambda a: a.update(workspace=DecodeWorkspace.allocate(2, 2, 1, 64, 2, a["q"].device)),
                        "workspace is for"),
    "workspace rows": (lambda a: a.update(workspace=DecodeWorkspace.allocate(1, 4, 2, 64, 2, a["q"].device)),
                       "workspace is for"),
    "workspace splits": (lambda a: DecodeWorkspace.allocate(2, 4, 2, 64, 3, a["q"].device), "power of two"),
}


@pytest.mark.parametrize("case", sorted(_BAD))
def test_bad_arguments_are_value_errors(device, case):
    change, message = _BAD[case]
    q, pool, (indptr, indices, last) = _inputs([3, 9], 4, 2, 64, 4, device)
    args = dict(q=q, kv_cache=pool, kv_indptr=indptr, kv_indices=indices, kv_last_page_len=last, scale=0.125)
    with pytest.raises(ValueError, match=message):
        change(args)
        decode_attention(**args)


# (num_qo_heads, num_kv_heads, head_dim); Qwen2.5-7B's group of 7 heads merges 4 slices a step (merge_step)
REAL = {"qwen3-0.6b": (16, 8, 128), "smollm2-135m": (9, 3, 64), "qwen2.5-7b": (28, 4, 128)}
GPU_LENGTHS = {1: [1], 2: [16384, 1], 4: [512, 17, 4096, 1000], 8: [1, 16, 17, 255, 256, 2049, 8191, 700]}


@pytest.mark.gpu
@pytest.mark.parametrize("tables_ready", [False, True])
@pytest.mark.parametrize("num_rows", sorted(GPU_LENGTHS))
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_shapes_on_gpu(name, num_rows, tables_ready):
    num_qo, num_kv, head_dim = REAL[name]
    for lengths in (GPU_LENGTHS[num_rows], [512] * num_rows, [16384] * num_rows):
        q, pool, tables = _inputs(lengths, num_qo, num_kv, head_dim, 16, "cuda", seed=num_rows)
        _check(q, pool, tables, decode_attention(q, pool, *tables, head_dim**-0.5, tables_ready=tables_ready))


@pytest.mark.gpu
@pytest.mark.parametrize("tables_ready", [False, True])
@pytest.mark.parametrize("name", sorted(REAL))
def test_replays_in_a_cuda_graph_with_new_lengths(name, tables_ready):
    """Captured once over static page tables, replayed for other lengths (and a pool large enough for all); with
    tables_ready as the graph decode launches it (tables copied before each replay, read before the PDL wait, the
    first KV block prefetched into L2)."""
    num_qo, num_kv, head_dim = REAL[name]
    rows, max_pages = 4, 4 * 1024
    q, pool, _ = _inputs([16 * max_pages // rows] * rows, num_qo, num_kv, head_dim, 16, "cuda")
    static = dict(q=q.clone(), indptr=torch.zeros(rows + 1, dtype=torch.int32, device="cuda"),
                  indices=torch.zeros(max_pages, dtype=torch.int32, device="cuda"),
                  last=torch.ones(rows, dtype=torch.int32, device="cuda"))
    ws = DecodeWorkspace.allocate(rows, num_qo, num_kv, head_dim, 16, "cuda")

    def attend():
        return decode_attention(static["q"], pool, static["indptr"], static["indices"], static["last"],
                                head_dim**-0.5, workspace=ws, tables_ready=tables_ready)

    static["indptr"].copy_(torch.arange(rows + 1, dtype=torch.int32))  # one page each, for the warm-up
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        attend()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = attend()
    torch.cuda.current_stream().wait_stream(stream)
    for seed, lengths in enumerate(([1, 2, 3, 4], [16384, 1, 513, 7000], [40, 16000, 16, 17], [1] * 4)):
        new_q, _, (indptr, indices, last) = _inputs(lengths, num_qo, num_kv, head_dim, 16, "cuda", seed=seed)
        indices = torch.randperm(pool.shape[0], device="cuda")[: len(indices)].to(torch.int32)
        static["q"].copy_(new_q)
        static["indptr"].copy_(indptr)
        static["indices"][: len(indices)].copy_(indices)
        static["last"].copy_(last)
        graph.replay()
        _check(new_q, pool, (indptr, indices, last), out)
    assert not ws.arrivals.any()


# The comparison itself, fed outputs with the bugs it must catch, at the GPU shapes (plain torch on the CPU).
CHECK_LENGTHS = [4096, 16384]


@pytest.fixture(scope="module")
def long_rows():
    """Rows of 4k and 16k tokens at Qwen3-0.6B's heads, on the CPU, and their float32 reference."""
    num_qo, num_kv, head_dim = REAL["qwen3-0.6b"]
    q, pool, tables = _inputs(CHECK_LENGTHS, num_qo, num_kv, head_dim, 16, "cpu", seed=7)
    q32, pool32 = q.float(), pool.float()
    return q32, pool32, tables, decode_attention_ref(q32, pool32, *tables, head_dim**-0.5)


def _without_tail(tables, fraction, page_size=16):
    """Page tables with the last `fraction` of each row's pages left out (the rows here fill whole pages)."""
    indptr, indices, last = tables
    kept = [indices[a : b - (b - a) * fraction.numerator // fraction.denominator]
            for a, b in zip(indptr.tolist(), indptr[1:].tolist())]
    new_indptr = torch.tensor([0, *map(len, kept)]).cumsum(0).to(torch.int32)
    return new_indptr, torch.cat(kept), torch.full_like(last, page_size)


def _one_wrong_page(tables, num_pages):
    """Page tables where one page of each row (its middle one) is a page no row uses."""
    indptr, indices, last = tables
    unused = sorted(set(range(num_pages)) - set(indices.tolist()))
    indices = indices.clone()
    for row, (a, b) in enumerate(zip(indptr.tolist(), indptr[1:].tolist())):
        indices[(a + b) // 2] = unused[row % len(unused)]
    return indptr, indices, last


@pytest.mark.parametrize("fraction", [(1, 16), (1, 8)], ids=["1/16", "1/8"])
def test_attention_check_rejects_a_lost_split(long_rows, fraction):
    from fractions import Fraction

    q, pool, tables, ref = long_rows
    lost = decode_attention_ref(q, pool, *_without_tail(tables, Fraction(*fraction)), q.shape[-1] ** -0.5)
    print(f"lost {fraction[0]}/{fraction[1]}: smallest relative error {relative_errors(lost, ref).min():.3f}")
    for row in range(len(CHECK_LENGTHS)):  # each row alone: the check must not need the other row to fail
        with pytest.raises(AssertionError):
            assert_attention_close(lost[row : row + 1].to(torch.bfloat16), ref[row : row + 1])
    if fraction == (1, 16):  # which the old absolute tolerance (2e-2) passed at 16k tokens
        torch.testing.assert_close(lost[1], ref[1], atol=2e-2, rtol=2e-2)


def test_attention_check_rejects_one_wrong_page_per_row(long_rows):
    q, pool, tables, ref = long_rows
    wrong = decode_attention_ref(q, pool, *_one_wrong_page(tables, pool.shape[0]), q.shape[-1] ** -0.5)
    print(f"one wrong page: smallest relative error {relative_errors(wrong, ref).min():.3f}")
    for row in range(len(CHECK_LENGTHS)):
        with pytest.raises(AssertionError):
            assert_attention_close(wrong[row : row + 1].to(torch.bfloat16), ref[row : row + 1])
    torch.testing.assert_close(wrong, ref, atol=2e-2, rtol=2e-2)  # which the old absolute tolerance passed


def test_attention_check_accepts_bf16_rounding(long_rows):
    """The reference moved by up to two bf16 steps per element (more than the kernel's one rounding), then rounded
    to bf16, passes with room: its largest relative error is well under the bound."""
    *_, ref = long_rows
    g = torch.Generator().manual_seed(0)
    noisy = (ref * (1 + (torch.rand(ref.shape, generator=g) * 2 - 1) * 2**-8)).to(torch.bfloat16)
    assert_attention_close(noisy, ref)
    assert relative_errors(noisy, ref).max() < ATTENTION_REL_TOL / 2
