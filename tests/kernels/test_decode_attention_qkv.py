"""decode_attention_qkv (QK-norm, RoPE, the new K/V's write and the decode attention in one launch) against the
composition it replaces: qk_norm_rope_write_kv_ref, then float32 attention (decode_attention_ref) over the pool it
wrote. The pool must hold the same bits as the reference's (with QK-norm on random inputs: the same rounding, the
norm's sum of squares being summed in another order), and the output must match as decode_attention's does.

Each row's newest slot starts poisoned (keys and values of 100): a program that attended before its own write of
the new key and value landed would put nearly all the weight on the stale key and fail by far. On the CPU through
the interpreter at small shapes; on the GPU at the 8B layouts and SmolLM2's."""
from __future__ import annotations

import pytest
import torch

from braid_kernels.decode_attention import (
    DecodeWorkspace,
    decode_attention,
    decode_attention_qkv,
    decode_attention_qkv_ref,
    decode_attention_ref,
)
from braid_kernels.int8_rows import empty_int8_rows, quantize_rows
from braid_kernels.qk_norm_rope import qk_norm_rope_write_kv, qk_norm_rope_write_kv_ref
from tests.kernels.common import assert_rounding_matches, assert_same_bits, norm_weight, rope_tables
from tests.kernels.test_decode_attention import _inputs as attention_inputs
from tests.support.numerics import assert_attention_close

# name: (num_qo_heads, num_kv_heads, head_dim, qk_norm, theta)
LAYOUTS = {"qwen3-like": (4, 2, 128, True, 1e6), "llama-like": (6, 2, 64, False, 1e4),
           "gqa8-norm": (8, 1, 64, True, 1e6)}
REAL = {"qwen3-8b": (32, 8, 128, True, 1e6), "llama-3.1-8b": (32, 8, 128, False, 5e5),
        "smollm2-135m": (9, 3, 64, False, 1e5)}
POISON = 100.0


def _inputs(lengths, layout, page_size, device, seed=0):
    """Keyword arguments of decode_attention_qkv: a random pool and page tables for rows of `lengths` tokens (0: a
    padding row, slot -1), each row's newest token the last of its KV, its slot poisoned."""
    num_qo, num_kv, head_dim, qk_norm, theta = layout
    _, pool, (indptr, indices, last) = attention_inputs(lengths, num_qo, num_kv, head_dim, page_size, device,
                                                        seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    slots = torch.tensor([int(indices[indptr[i + 1] - 1]) * page_size + int(last[i]) - 1 if n else -1
                          for i, n in enumerate(lengths)])
    for slot in slots[slots >= 0].tolist():
        pool[slot // page_size, :, :, slot % page_size] = POISON
    cos, sin = rope_tables(head_dim, theta, max(lengths) + 1, device)
    args = dict(qkv=(3 * torch.randn(len(lengths), (num_qo + 2 * num_kv) * head_dim, generator=g)).to(pool.dtype)
                .to(device), positions=torch.tensor([max(n - 1, 0) for n in lengths], device=device), cos=cos,
                sin=sin, slot_mapping=slots.to(device), kv_cache=pool, kv_indptr=indptr, kv_indices=indices,
                kv_last_page_len=last, scale=head_dim**-0.5)
    if qk_norm:
        args["q_norm_weight"] = norm_weight(head_dim, pool.dtype, device, high=4.0, generator=g)
        args["k_norm_weight"] = norm_weight(head_dim, pool.dtype, device, high=96.0, generator=g)
    return args


def _reference(args):
    """(float32 output, pool) of the composition: the kernels' reference rotation and write, then float32
    attention."""
    pool = args["kv_cache"].clone()
    rope = {k: args[k] for k in ("qkv", "positions", "cos", "sin", "slot_mapping", "q_norm_weight", "k_norm_weight")
            if k in args}
    q = qk_norm_rope_write_kv_ref(**rope, kv_cache=pool)
    tables = (args["kv_indptr"], args["kv_indices"], args["kv_last_page_len"])
    return decode_attention_ref(q.float(), pool.float(), *tables, args["scale"]), pool


def _check(args, out, pool, qk_norm):
    ref, ref_pool = _reference(args)
    (assert_rounding_matches if qk_norm else assert_same_bits)(pool, ref_pool)
    assert out.dtype == args["qkv"].dtype
    assert_attention_close(out, ref)


FLAGS = {"eager": dict(), "graph": dict(tables_ready=True, static_weights=True, positions_ready=True)}
CPU_CASES = {  # name: (lengths, page_size, num_splits, min_split_tokens)
    "slices": ([1, 5, 37, 64], 4, 4, 8),
    "one-slice-each": ([9, 1, 50], 8, 2, 64),
    "merged-in-steps": ([200, 45], 4, 16, 8),
    "padding-row": ([17, 0, 3], 4, 4, 8),
}


@pytest.mark.parametrize("flags", sorted(FLAGS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("case", sorted(CPU_CASES))
def test_matches_the_composition(device, case, layout, flags):
    lengths, page_size, splits, min_split = CPU_CASES[case]
    args = _inputs(lengths, LAYOUTS[layout], page_size, device, seed=len(case))
    num_qo, num_kv, head_dim, qk_norm, _ = LAYOUTS[layout]
    ws = DecodeWorkspace.allocate(len(lengths), num_qo, num_kv, head_dim, splits, device)
    pool = args["kv_cache"].clone()
    out = decode_attention_qkv(**dict(args, kv_cache=pool), workspace=ws, min_split_tokens=min_split, block_n=16,
                               **FLAGS[flags])
    padding = [i for i, n in enumerate(lengths) if n == 0]
    assert not out[padding].any(), "a row without KV gets zeros"
    keep = [i for i, n in enumerate(lengths) if n]
    kept = dict(args, qkv=args["qkv"][keep], positions=args["positions"][keep],
                slot_mapping=args["slot_mapping"][keep], kv_last_page_len=args["kv_last_page_len"][keep],
                kv_indptr=torch.unique_consecutive(args["kv_indptr"]))  # rows without pages repeat an entry
    _check(kept, out[keep], pool, qk_norm)
    assert not ws.arrivals.any(), "a launch must leave the arrival counters at zero"


def test_reference_is_the_composition(device):
    args = _inputs([5, 40], LAYOUTS["qwen3-like"], 4, device)
    ours = dict(args, kv_cache=args["kv_cache"].clone())
    out = decode_attention_qkv_ref(**ours)
    ref, pool = _reference(args)
    assert_same_bits(ours["kv_cache"], pool)
    assert_same_bits(out, ref.to(out.dtype))


@pytest.mark.parametrize("layout", ["llama-like", "qwen3-like"])
def test_same_as_two_launches_with_int8_rows(device, layout):
    """The int8 launch (no mul+add contraction, as this one) after qk_norm_rope_write_kv gives the same output bits
    without QK-norm (nothing summed before attention); and the int8 runs are quantize_rows of the output."""
    num_qo, num_kv, head_dim, qk_norm, _ = LAYOUTS[layout]
    args = _inputs([1, 30, 77], LAYOUTS[layout], 4, device, seed=3)
    rows = empty_int8_rows(3, num_qo * head_dim, args["qkv"].dtype, device)
    ws = DecodeWorkspace.allocate(3, num_qo, num_kv, head_dim, 4, device)
    out = decode_attention_qkv(**args, workspace=ws, min_split_tokens=8, block_n=16, int8=rows)
    want = quantize_rows(out.flatten(1))
    assert torch.equal(rows.q, want.q) and torch.equal(rows.dx, want.dx) and torch.equal(rows.sx, want.sx)
    pool = args["kv_cache"].clone()  # the poisoned pool again: the two-launch path writes the same slots
    rope = {k: args[k] for k in ("qkv", "positions", "cos", "sin", "slot_mapping", "q_norm_weight", "k_norm_weight")
            if k in args}
    q = qk_norm_rope_write_kv(**rope, kv_cache=pool)
    two = decode_attention(q, pool, args["kv_indptr"], args["kv_indices"], args["kv_last_page_len"], args["scale"],
                           workspace=ws, min_split_tokens=8, block_n=16,
                           int8=empty_int8_rows(3, num_qo * head_dim, q.dtype, device))
    (assert_rounding_matches if qk_norm else assert_same_bits)(out, two)


def test_bad_rotation_inputs_are_value_errors(device):
    args = _inputs([3, 9], LAYOUTS["qwen3-like"], 4, device)
    with pytest.raises(ValueError, match="q_norm_weight and k_norm_weight"):
        decode_attention_qkv(**dict(args, k_norm_weight=None))
    with pytest.raises(ValueError, match="positions must have shape"):
        decode_attention_qkv(**dict(args, positions=args["positions"][:1]))
    with pytest.raises(ValueError, match="kv_indptr must have shape"):
        decode_attention_qkv(**dict(args, kv_indptr=args["kv_indptr"][:-1]))


GPU_LENGTHS = {"1": [1], "1x300": [300], "4": [512, 17, 4096, 1000], "8": [1, 16, 17, 255, 256, 2049, 8191, 700]}


@pytest.mark.gpu
@pytest.mark.parametrize("flags", sorted(FLAGS))
@pytest.mark.parametrize("rows", sorted(GPU_LENGTHS))
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_shapes_on_gpu(name, rows, flags):
    """Real head layouts, the default launch (slices as the graph decode cuts them) at lengths from one token to 8k;
    the row of 300 tokens is the decode benchmark's."""
    args = _inputs(GPU_LENGTHS[rows], REAL[name], 16, "cuda", seed=len(rows))
    pool = args["kv_cache"].clone()
    out = decode_attention_qkv(**dict(args, kv_cache=pool), **FLAGS[flags])
    _check(args, out, pool, REAL[name][3])
