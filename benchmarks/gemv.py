"""The GEMV kernels of braid_kernels/gemv.py against what the model ran before them, per projection of a decoder layer, at
batch 1 (and a few rows) on CUDA; and a sweep of launch configurations to choose kernels.gemv.launch_config from.

    python benchmarks/gemv.py [--models qwen3-0.6b,smollm2-135m] [--rows 1,2,4,8] [--sweep qwen3-0.6b]
        [--out sweep.txt]

Each time is one launch's share of a CUDA graph of back-to-back launches (like the decode graph's layers), each
launch reading a different copy of the weight, and more copies than L2 holds, so the weights come from HBM as in
the model. The kernels are compiled first, in parallel processes (Triton's on-disk cache then serves the timing
process). GB/s counts the weight bytes only (x, the norm weight and the output are ~0.1% of them). Baselines:
`cublas` is F.linear alone; `before` is what the model runs without the GEMV kernels, the elementwise Triton kernel
the prologue replaces (kernels.fused_add_rms_norm / kernels.silu_and_mul) followed by F.linear.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, for `kernels`

from latency import QWEN3_0_6B, SMOLLM2_135M, copy_bandwidth, time_graph

import braid_kernels as kernels
from braid_kernels.gemv import GemvConfig, launch_config

MODELS = {"qwen3-0.6b": QWEN3_0_6B, "smollm2-135m": SMOLLM2_135M}
L2_BYTES_TO_DEFEAT = 160e6  # > 3x the H100's 50 MB L2
EPS = 1e-6

# (block_n, block_k, num_warps, num_stages): stages 1 keeps a whole block of weight in registers per step, more
# stages pipeline the weight through shared memory (tl.range num_stages).
SWEEP = [GemvConfig(*c) for c in [
    (1, 1024, 4, 1), (2, 1024, 4, 1), (4, 1024, 4, 1), (8, 1024, 4, 1), (4, 1024, 8, 1), (8, 1024, 8, 1),
    (16, 1024, 8, 1), (2, 512, 4, 1), (4, 512, 4, 1), (8, 512, 4, 1), (16, 512, 4, 1), (4, 256, 4, 1),
    (2, 512, 4, 3), (4, 256, 4, 3), (4, 512, 4, 3), (8, 256, 4, 3), (8, 512, 4, 3), (16, 256, 4, 3),
    (8, 256, 4, 4), (4, 512, 4, 2), (1, 512, 2, 1), (2, 2048, 8, 1), (4, 2048, 8, 1), (4, 4096, 8, 1),
]]


def sweep_configs(rows: int) -> list[GemvConfig]:
    """SWEEP at one row; at more rows a few with BLOCK_M * BLOCK_N * BLOCK_K = 4096 or 8192 (32 or 64 partial sums
    per thread), beyond which they spill."""
    if rows == 1:
        return SWEEP
    block_m = 1 << (rows - 1).bit_length()
    return [GemvConfig(2, 2048 // block_m, 4, 1), GemvConfig(2, 2048 // block_m, 4, 2),
            GemvConfig(4, 1024 // block_m, 4, 1), GemvConfig(1, 4096 // block_m, 4, 1),
            GemvConfig(2, 4096 // block_m, 8, 1)]


def projections(shape: dict) -> list[tuple[str, str, int, int]]:
    """(name, prologue, N, K) of one decoder layer's projections."""
    hidden, inter, hd = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    return [("qkv", "add_rms_norm", q + 2 * kv, hidden), ("o", "none", hidden, q),
            ("gate_up", "add_rms_norm", 2 * inter, hidden), ("down", "silu_and_mul", hidden, inter)]


class Case:
    """One projection's inputs: `copies` weights [N, K] in bf16 and the activations of `rows` rows."""

    def __init__(self, prologue: str, n: int, k: int, rows: int, copies: int | None = None):
        self.prologue, self.n, self.k, self.rows = prologue, n, k, rows
        self.weight_bytes = n * k * 2
        self.copies = copies or max(28, math.ceil(L2_BYTES_TO_DEFEAT / self.weight_bytes))
        g = torch.Generator(device="cuda").manual_seed(n + k)
        self.weights = [torch.randn(n, k, device="cuda", generator=g).div_(k ** 0.5).bfloat16()
                        for _ in range(self.copies)]
        width = 2 * k if prologue == "silu_and_mul" else k
        self.x = torch.randn(rows, width, device="cuda", generator=g).bfloat16()
        self.x_k = self.x[:, :k].contiguous()  # what F.linear gets in `cublas`
        self.residual = torch.randn(rows, k, device="cuda", generator=g).bfloat16()
        self.norm_weight = (0.5 + torch.rand(k, device="cuda", generator=g)).bfloat16()

    def triton(self, w: torch.Tensor, config: GemvConfig | None = None) -> torch.Tensor:
        if self.prologue == "none":
            return kernels.gemv(self.x, w, config=config)
        if self.prologue == "add_rms_norm":
            return kernels.fused_add_rms_norm_gemv(self.x, self.residual, self.norm_weight, EPS, w, config=config)[0]
        return kernels.silu_and_mul_gemv(self.x, w, config=config)

    def before(self, w: torch.Tensor) -> torch.Tensor:
        if self.prologue == "none":
            return F.linear(self.x, w)
        if self.prologue == "add_rms_norm":
            return F.linear(kernels.fused_add_rms_norm(self.x, self.residual, self.norm_weight, EPS)[0], w)
        return F.linear(kernels.silu_and_mul(self.x), w)

    def cublas(self, w: torch.Tensor) -> torch.Tensor:
        return F.linear(self.x_k, w)

    def us_per_launch(self, fn, replays: int = 20) -> float:
        """Microseconds per call of fn(weight), from a CUDA graph of one call per weight copy."""
        return time_graph(lambda: [fn(w) for w in self.weights], replays) / self.copies

    def error(self, config: GemvConfig | None) -> float:
        """Largest |kernel - F.linear in float32|, in units of the largest output: ~0.004 (bf16) when right."""
        y = self.triton(self.weights[0], config).float()
        want = self.before(self.weights[0]).float()
        return ((y - want).abs().max() / want.abs().max()).item()


def _compile(job: tuple[str, int, int, GemvConfig | None]) -> None:
    """Compiles the kernel for (prologue, K, rows, config) into Triton's cache: N only has to divide by 16 as the
    real ones do, for the same specialisation."""
    prologue, k, rows, config = job
    try:
        case = Case(prologue, 128, k, rows, copies=1)
        case.triton(case.weights[0], config)
    except Exception as e:  # noqa: BLE001 - the timing process compiles it again and reports the error
        print(f"precompiling {job}: {type(e).__name__}")


def precompile(jobs: list, workers: int = 12) -> None:
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_compile, sorted(set(jobs), key=str)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen3-0.6b,smollm2-135m")
    ap.add_argument("--rows", default="1,2,4,8", help="rows of x (batch sizes)")
    ap.add_argument("--sweep", default="", help="models (comma-separated) whose projections are timed with every "
                    "configuration of sweep_configs")
    ap.add_argument("--out", help="also write every measurement to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    rows = [int(r) for r in args.rows.split(",")]
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    summary = []
    plan = [(model, name, prologue, n, k, m) for model in args.models.split(",")
            for name, prologue, n, k in projections(MODELS[model]) for m in rows]
    sweep = args.sweep.split(",")
    precompile([(prologue, k, m, launch_config(m, n, k, num_sms)) for _, _, prologue, n, k, m in plan]
               + [(prologue, k, m, c) for model, _, prologue, n, k, m in plan if model in sweep
                  for c in sweep_configs(m)])
    print(f"device: {torch.cuda.get_device_name()}, {num_sms} SMs, torch {torch.__version__}; "
          f"copy bandwidth {copy_bandwidth() / 1e9:.0f} GB/s (read + write)")
    lines = []
    for model, name, prologue, n, k, m in plan:
        case = Case(prologue, n, k, m)
        cublas, before = case.us_per_launch(case.cublas), case.us_per_launch(case.before)
        chosen = launch_config(m, n, k, num_sms)
        timed = {chosen: case.us_per_launch(case.triton)}
        if model in sweep:
            for config in sweep_configs(m):
                if config not in timed:
                    try:
                        timed[config] = case.us_per_launch(lambda w, c=config, run=case.triton: run(w, c))
                    except Exception as e:  # noqa: BLE001 - a configuration that does not compile
                        print(f"  {config} failed: {type(e).__name__}: {str(e)[:100]}")
            for config, us in sorted(timed.items(), key=lambda t: t[1]):
                lines.append(f"{model} {name} M={m} N={n} K={k} {tuple(config)} {us:.2f} us "
                             f"{case.weight_bytes / (us * 1e3):.0f} GB/s err {case.error(config):.4f}")
        best = min(timed, key=timed.get)
        summary.append((model, name, m, n, k, cublas, before, timed[chosen], chosen, timed[best], best,
                        case.error(None), case.weight_bytes / 1e3))
        del case
        torch.cuda.empty_cache()
    print(f"{'model':<13}{'proj':<8}{'M':>2}{'N':>6}{'K':>6} | {'cublas us':>9}{'GB/s':>6} | {'before us':>9}"
          f"{'GB/s':>6} | {'gemv us':>8}{'GB/s':>6} {'(config)':<20}| {'best us':>8} {'(config)':<20}| err")
    for model, name, m, n, k, cublas, before, ours, chosen, best_us, best, err, bw in summary:
        print(f"{model:<13}{name:<8}{m:>2}{n:>6}{k:>6} | {cublas:>9.2f}{bw / cublas:>6.0f} | {before:>9.2f}"
              f"{bw / before:>6.0f} | {ours:>8.2f}{bw / ours:>6.0f} {tuple(chosen)!s:<20}| {best_us:>8.2f} "
              f"{tuple(best)!s:<20}| {err:.4f}")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
