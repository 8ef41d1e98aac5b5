"""Braid's CPU integer-dot product (braid_kernels/cpu_quant.c) against torch's CPU int4 weight-only matmul on the
embedded SmolLM2-135M's projection shapes: x rounded to one int8 term (llama.cpp's rounding) and to two (the default).
Q6_K (Q4_K_M files' type for some projections and the lm_head), which torch's int4 op cannot hold, against the float32
matmul of its decoded weights (what the CPU did with Q6_K before the kernels took it).

    python benchmarks/cpu_kernels.py [--threads 1 2] [--rows 1 4 1541]

Random weights quantised with the tests' GGUF quantiser; each time is the median of repeated calls on one weight,
which stays in cache (in a decode step each weight comes from memory once: see cpu_decode.py for the whole model).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

SHAPES = [("Q4_1", 960, 576), ("Q4_1", 3072, 576), ("Q4_1", 576, 1536), ("Q8_0", 49152, 576), ("Q5_0", 960, 576),
          ("Q5_0", 3072, 576), ("Q6_K", 576, 1536), ("Q6_K", 49152, 768)]
"""The embedded model's q/k/v, gate/up and down projections (Q4_1) and its tied lm_head (Q8_0); Q5_0 the q/k/v and
gate/up of llama.cpp's Q4_K_M of it (5-bit codes); Q6_K a down projection and an lm_head (k a multiple of 256)."""


def median_us(fn, reps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e6


def show(us: float) -> str:
    return f"{us:.1f} us" if us < 1e4 else f"{us / 1e3:.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 1541], help="rows of x (the lm_head: 1 only)")
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from braid_kernels import cpu_quant
    from braidinfer.layers import cpu_int4
    from tests.support.gguf_quant import quantize

    if not cpu_quant.available():
        raise SystemExit(f"Braid's CPU kernels do not run here: {cpu_quant.unavailable_reason()}")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("| threads | weight | rows of x | torch int4 op (Q6_K: float32 matmul) | dot, x in 1 int8 term | "
          "dot, 2 terms (default) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for qtype, n, k in SHAPES:
            blocks = torch.from_numpy(quantize((torch.randn(n, k) * 0.05).numpy(), qtype))
            packed = cpu_quant.pack(blocks, qtype)
            if qtype == "Q6_K":
                decoded = cpu_quant.dequantize(packed)
                baseline = lambda x: torch.nn.functional.linear(x, decoded)  # noqa: E731
            else:
                terms = cpu_int4.pack(blocks, qtype)
                baseline = lambda x: cpu_int4.linear(x, terms)  # noqa: E731
            for m in args.rows if n < 49152 else [1]:
                x = torch.randn(m, k)
                reps = 200 if m < 64 else 5
                op = median_us(lambda: baseline(x), reps)
                one = median_us(lambda: cpu_quant.linear(x, packed, x_terms=1), reps)
                two = median_us(lambda: cpu_quant.linear(x, packed, x_terms=2), reps)
                print(f"| {threads} | {qtype} {n}x{k} | {m} | {show(op)} | {show(one)} ({op / one:.2f}x) | "
                      f"{show(two)} ({op / two:.2f}x) |")


if __name__ == "__main__":
    main()
