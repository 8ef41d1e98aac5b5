"""Paged decode attention for small batches: the Triton kernel (kernels.decode_attention, split-KV with its merge in
the same launch) against FlashInfer's CUDA-graph decode wrapper, planned as braidinfer's FlashInferGraphDecode plans
it, same pool, same page tables, same run.

    python benchmarks/decode_attention.py [--rows 1,2,4,8] [--contexts 512,4096,16384] [--layouts ...] [--int8]
        [--sweep]

Each measurement is one decode step's worth of attention: `--layers` (28, Qwen3-0.6B) back-to-back calls, each over
its own layer's pool (so the KV does not sit in L2 between calls), captured in a CUDA graph and replayed; printed as
microseconds per call and the KV bytes read per second. Page size 16, bf16, random page order. The Triton launch uses
the default slice count (default_num_splits: the fixed grid a CUDA graph captured for any length gets); FlashInfer
is re-planned for each context (its schedule follows the lengths). `--sweep` moves each of the kernel's tuning knobs
(num_splits, num_warps, block_n, min_split_tokens) alone from its default on a few cases: the measurement behind the
defaults. `--int8` has the Triton kernel also write its output as int8 rows, as a one-row decode step of a quantised
model launches it (o_proj's input, braid_kernels/int8_rows.py).
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from braid_kernels.decode_attention import (  # noqa: E402
    DecodeWorkspace, decode_attention, default_block_n, default_num_splits, default_num_warps)
from braid_kernels.int8_rows import empty_int8_rows  # noqa: E402
from latency import time_graph  # noqa: E402

LAYOUTS = {"qwen3-0.6b": (16, 8, 128), "smollm2-135m": (9, 3, 64),  # (num_qo_heads, num_kv_heads, head_dim)
           "llama-3.1-8b": (32, 8, 128)}
PAGE_SIZE = 16


class Case:
    """`layers` one-layer pools holding `rows` sequences of `context` tokens each, their CSR page tables and q."""

    def __init__(self, layout: str, rows: int, context: int, layers: int):
        self.num_qo_heads, self.num_kv_heads, self.head_dim = LAYOUTS[layout]
        self.rows, self.context = rows, context
        pages_per_row = -(-context // PAGE_SIZE)
        num_pages = rows * pages_per_row
        self.pools = torch.empty(layers, num_pages, 2, self.num_kv_heads, PAGE_SIZE, self.head_dim,
                                 dtype=torch.bfloat16, device="cuda").normal_()
        self.q = torch.randn(rows, self.num_qo_heads, self.head_dim, dtype=torch.bfloat16, device="cuda")
        self.kv_indptr = torch.arange(rows + 1, dtype=torch.int32) * pages_per_row
        self.kv_indices = torch.randperm(num_pages, device="cuda").to(torch.int32)
        self.kv_last_page_len = torch.full((rows,), context - (pages_per_row - 1) * PAGE_SIZE, dtype=torch.int32)
        self.scale = self.head_dim**-0.5

    @property
    def kv_bytes(self) -> int:
        """KV bytes one call reads."""
        return 2 * self.rows * self.context * self.num_kv_heads * self.head_dim * self.pools.element_size()

    def tables(self):
        return self.kv_indptr.cuda(), self.kv_indices, self.kv_last_page_len.cuda()


def triton_us(case: Case, num_splits: int | None = None, int8: bool = False, **tuning) -> tuple[float, torch.Tensor]:
    """(us per call, the last layer's output) of the Triton kernel; with int8, also writing the output's int8 rows."""
    splits = num_splits or default_num_splits(case.rows, case.num_kv_heads, case.head_dim, _num_sms())
    ws = DecodeWorkspace.allocate(case.rows, case.num_qo_heads, case.num_kv_heads, case.head_dim, splits, "cuda")
    tables, outs = case.tables(), []
    if int8:
        tuning["int8"] = empty_int8_rows(case.rows, case.num_qo_heads * case.head_dim, torch.bfloat16, "cuda")

    def step():
        outs[:] = [decode_attention(case.q, pool, *tables, case.scale, workspace=ws, **tuning) for pool in case.pools]

    return time_graph(step) / len(case.pools), outs[-1]


def flashinfer_us(case: Case, workspace: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(us per call, the last layer's output) of FlashInfer's CUDA-graph decode, planned as FlashInferGraphDecode."""
    import flashinfer

    indptr, indices, last = (t.clone() for t in case.tables())
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, kv_layout="HND", use_cuda_graph=True, paged_kv_indptr_buffer=indptr,
        paged_kv_indices_buffer=indices, paged_kv_last_page_len_buffer=last)
    wrapper.plan(case.kv_indptr, case.kv_indices, case.kv_last_page_len, case.num_qo_heads, case.num_kv_heads,
                 case.head_dim, PAGE_SIZE, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
                 sm_scale=case.scale)
    outs = []

    def step():
        outs[:] = [wrapper.run(case.q, pool) for pool in case.pools]

    return time_graph(step) / len(case.pools), outs[-1]


def _num_sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count


def compare(layouts, rows_list, contexts, layers: int, int8: bool = False) -> None:
    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
    print(f"{'layout':<13} {'rows':>4} {'context':>7} {'splits':>6} | {'flashinfer us':>13} {'GB/s':>6} | "
          f"{'triton us':>9} {'GB/s':>6} | {'speedup':>7} {'max |diff|':>10}")
    for layout, rows, context in itertools.product(layouts, rows_list, contexts):
        case = Case(layout, rows, context, layers)
        fi, fi_out = flashinfer_us(case, workspace)
        tr, tr_out = triton_us(case, int8=int8)
        diff = (fi_out.float() - tr_out.float()).abs().max().item()
        splits = default_num_splits(rows, case.num_kv_heads, case.head_dim, _num_sms())
        print(f"{layout:<13} {rows:>4} {context:>7} {splits:>6} | {fi:>13.2f} {case.kv_bytes / fi / 1e3:>6.0f} | "
              f"{tr:>9.2f} {case.kv_bytes / tr / 1e3:>6.0f} | {fi / tr:>7.2f} {diff:>10.2e}")
        del case
    torch.cuda.empty_cache()


SWEEP_CASES = [("qwen3-0.6b", 1, 512), ("qwen3-0.6b", 1, 4096), ("qwen3-0.6b", 1, 16384), ("qwen3-0.6b", 8, 512),
               ("smollm2-135m", 1, 512), ("smollm2-135m", 1, 16384), ("smollm2-135m", 8, 16384)]


def sweep(layers: int) -> None:
    """Each tuning knob moved alone from its default, on short and long contexts."""
    print("\nsweep (us per call; each knob alone moved from the default):")
    for layout, rows, context in SWEEP_CASES:
        case = Case(layout, rows, context, layers)
        splits = default_num_splits(rows, case.num_kv_heads, case.head_dim, _num_sms())
        block_n, warps = default_block_n(case.head_dim), default_num_warps(splits, case.head_dim)
        variants = {f"splits={splits // 2}": dict(num_splits=splits // 2), f"splits={splits * 2}":
                    dict(num_splits=splits * 2), f"warps={6 - warps}": dict(num_warps=6 - warps),
                    f"block_n={block_n * 2}": dict(block_n=block_n * 2), f"block_n={block_n // 2}":
                    dict(block_n=block_n // 2), "min_split=64": dict(min_split_tokens=64)}
        results = {name: triton_us(case, **kw)[0] for name, kw in variants.items()}
        print(f"{layout} rows={rows} context={context}: default (splits={splits} warps={warps} block_n={block_n} "
              f"min_split=32) {triton_us(case)[0]:.2f}; " + "; ".join(f"{k} {v:.2f}" for k, v in results.items()))
        del case
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--contexts", default="512,4096,16384")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--layers", type=int, default=28, help="calls per captured step (Qwen3-0.6B: 28)")
    ap.add_argument("--sweep", action="store_true", help="also time the tuning knobs")
    ap.add_argument("--int8", action="store_true", help="the Triton kernel also writes its output's int8 rows")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()} ({_num_sms()} SMs), torch {torch.__version__}; page size "
          f"{PAGE_SIZE}, bf16, {args.layers} calls per graph" + (", Triton writing int8 rows" if args.int8 else ""))
    compare(args.layouts.split(","), [int(r) for r in args.rows.split(",")],
            [int(c) for c in args.contexts.split(",")], args.layers, args.int8)
    if args.sweep:
        sweep(args.layers)


if __name__ == "__main__":
    main()
