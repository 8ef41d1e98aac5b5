"""What each kind of short launch costs a batch-1 decode step of a quantised model: the decode speed with every launch
of one kind replaced by nothing, beside the speed with all of them, same run, same GGUF file.

    BRAID_TEST_TOKENIZER=/path/to/tokenizer python benchmarks/launch_costs.py
        [--config benchmarks/configs/llama-3.1-8b.json] [--format Q4_K_M] [--prompt 256] [--tokens 128]
        [--requests 6] [--without silu,norm,rope,attention,silu+norm+rope] [--workdir /big/disk]

A replaced launch's output is a zero tensor made once, outside the decode graph, so the replaced run's tokens are
garbage and its speed is an upper bound on what fusing that kind of launch away could save, not a result. The kinds
(what a one-row step of the quantised GEMV plan launches, braidinfer/layers):

    silu       SiLU-and-mul writing down_proj's int8 rows (braid_kernels.silu_and_mul_int8), one a layer
    norm       RMSNorm writing the next projection's int8 rows (braid_kernels.rms_norm_int8, its residual add left
               out: the residual stream keeps x), two a layer and the final norm
    rope       QK-norm / RoPE / KV write (braid_kernels.qk_norm_rope_write_kv: q passed on unrotated, no KV written),
               one a layer
    attention  the graph decode's attention where it writes o_proj's int8 rows (FlashInferGraphDecode.attend: q
               passed on as the output, the int8 rows left as allocated), one a layer

"a+b" replaces several kinds in one run. Each run is a process of its own (a replacement must be in place before the
engine compiles its kernels and captures its graphs) that loads the file, decodes one warm-up request, then
--requests greedy ignore_eos requests of --prompt random tokens and --tokens new ones, each timed as
benchmarks/latency.py times a request (first streamed token to last). The table gives each run's median request,
its time per token, and the time per token saved against the run with every launch (divided by the launches a token
makes of that kind: per launch). Each run also reports how many calls it replaced while loading and capturing: a
kind that the model's plan does not launch replaces none, and its row says so. The model is random, as
benchmarks/quantized_decode.py writes it (--format Q4_K_M or Q8_0).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from latency import model_config, one_sequence_decode_speeds
from quantized_decode import CONFIGS, write_random_gguf
from throughput import device_name

KINDS = ("silu", "norm", "rope", "attention")


def launches_per_token(kind: str, num_layers: int) -> int:
    """Launches of `kind` in one decode step of a model of num_layers layers."""
    return 2 * num_layers + 1 if kind == "norm" else num_layers


def replace(kinds: list[str]) -> dict[str, int]:
    """Replaces every launch of each kind in `kinds` by nothing (see the module docstring); returns the counts of
    replaced calls by kind, which grow as the engine calls them."""
    import braid_kernels
    from braidinfer.attention.flashinfer_backend import FlashInferGraphDecode

    calls = dict.fromkeys(kinds, 0)
    zeros: dict[tuple, object] = {}

    def zero_rows(num_rows: int, k: int, dtype: torch.dtype, device: torch.device):
        key = (num_rows, k, dtype, str(device))
        if key not in zeros:
            rows = braid_kernels.empty_int8_rows(num_rows, k, dtype, device)
            for t in rows[:3]:
                t.zero_()
            zeros[key] = rows
        return zeros[key]

    if "silu" in kinds:
        def silu_and_mul_int8(x):
            calls["silu"] += 1
            return zero_rows(x.shape[0], x.shape[1] // 2, x.dtype, x.device)

        braid_kernels.silu_and_mul_int8 = silu_and_mul_int8
    if "norm" in kinds:
        def rms_norm_int8(x, weight, eps, residual=None, static_weight=False):
            calls["norm"] += 1
            return zero_rows(x.shape[0], x.shape[1], x.dtype, x.device), (x if residual is not None else None)

        braid_kernels.rms_norm_int8 = rms_norm_int8
    if "rope" in kinds:
        def qk_norm_rope_write_kv(qkv, positions, cos, sin, kv_cache, *args, **kwargs):
            calls["rope"] += 1
            num_kv_heads, head_dim = kv_cache.shape[2], kv_cache.shape[-1]
            q_size = qkv.shape[1] - 2 * num_kv_heads * head_dim
            return qkv[:, :q_size].unflatten(1, (q_size // head_dim, head_dim))

        braid_kernels.qk_norm_rope_write_kv = qk_norm_rope_write_kv
    if "attention" in kinds:
        attend = FlashInferGraphDecode.attend

        def attend_without_attention(self, layer, q, meta, int8=None):
            if int8 is None:
                return attend(self, layer, q, meta)
            calls["attention"] += 1
            return q

        FlashInferGraphDecode.attend = attend_without_attention
    return calls


def worker(args) -> None:
    """One run: prints {"kinds", "tok_s", "replaced"} as a JSON line."""
    kinds = [k for k in args.worker.split("+") if k != "none"]
    calls = replace(kinds)
    speeds = one_sequence_decode_speeds(args.gguf, args.prompt, args.tokens, args.requests,
                                        args.gpu_memory_utilization)
    print(json.dumps({"kinds": kinds, "tok_s": speeds, "replaced": calls}), flush=True)


def run_variant(variant: str, gguf: str, args) -> dict:
    """The worker's result for `variant` ("none" or kinds joined by "+"), run in a process of its own."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--gguf", gguf, "--prompt", str(args.prompt),
           "--tokens", str(args.tokens), "--requests", str(args.requests),
           "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"the run without {variant} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(CONFIGS, "llama-3.1-8b.json"), help="a published config.json")
    ap.add_argument("--format", default="Q4_K_M", choices=("Q4_K_M", "Q8_0"))
    ap.add_argument("--prompt", type=int, default=256, help="prompt length in tokens")
    ap.add_argument("--tokens", type=int, default=128, help="generated tokens per request")
    ap.add_argument("--requests", type=int, default=6, help="timed requests per run, after a warm-up")
    ap.add_argument("--without", default="silu,norm,rope,attention,silu+norm+rope",
                    help=f"comma-separated runs, each a kind or kinds joined by '+', from {', '.join(KINDS)}")
    ap.add_argument("--workdir", default=None, help="where the GGUF file goes (default: the system's temp dir)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # one run, in its own process
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    variants = args.without.split(",")
    for variant in variants:
        unknown = [k for k in variant.split("+") if k not in KINDS]
        if unknown:
            ap.error(f"--without: {', '.join(map(repr, unknown))} not among {', '.join(KINDS)}")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: the replaced launches are those of the GPU's one-row decode plan")
    tokenizer_dir = os.environ.get("BRAID_TEST_TOKENIZER")
    if tokenizer_dir is None:
        raise SystemExit("set BRAID_TEST_TOKENIZER to a saved tokenizer directory (as for quantized_decode.py)")
    with open(args.config, encoding="utf-8") as f:
        shape = json.load(f)
    config = model_config("config.json", shape)
    print(f"device: {device_name('cuda')}, torch {torch.__version__}")
    print(f"model: {os.path.basename(args.config).removesuffix('.json')} shape as {args.format}, random weights; "
          f"{args.prompt}-token prompt, {args.tokens} new tokens, {args.requests} requests a run", flush=True)
    with tempfile.TemporaryDirectory(prefix="launch_costs-", dir=args.workdir) as workdir:
        gguf = os.path.join(workdir, f"{args.format}.gguf")
        t0 = time.perf_counter()
        write_random_gguf(gguf, config, args.format, tokenizer_dir, "cuda")
        print(f"{gguf} written in {time.perf_counter() - t0:.0f} s", flush=True)
        results = {}
        for variant in ["none", *variants]:
            results[variant] = run_variant(variant, gguf, args)
            print(f"without {variant}: tok/s {[round(s, 1) for s in results[variant]['tok_s']]}, replaced calls "
                  f"{results[variant]['replaced']}", flush=True)
    base_us = 1e6 / statistics.median(results["none"]["tok_s"])
    layers = config.num_hidden_layers
    print(f"\n{'launches replaced':<28}{'median tok/s':>14}{'us/token':>10}{'saved us':>10}{'per launch':>12}")
    for variant, result in results.items():
        us = 1e6 / statistics.median(result["tok_s"])
        kinds = result["kinds"]
        line = f"{variant:<28}{statistics.median(result['tok_s']):>14.1f}{us:>10.0f}"
        if kinds:
            launches = sum(launches_per_token(k, layers) for k in kinds)
            line += f"{base_us - us:>10.0f}{(base_us - us) / launches:>12.2f}"
            if not all(result["replaced"].values()):
                line += "  (a kind was never called: not launched by this model's plan)"
        print(line)


if __name__ == "__main__":
    main()
