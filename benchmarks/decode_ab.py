"""Batch-1 decode speed of several source trees (or settings) of Braid on one quantised model file, each in a process
of its own, in the order given: the A/B measurement behind the engine's decode-step changes.

    BRAID_TEST_TOKENIZER=/path/to/tokenizer python benchmarks/decode_ab.py \\
        --variants main=/path/to/main,branch=.,main2=/path/to/main \\
        [--config benchmarks/configs/qwen3-8b.json] [--format Q4_K_M] [--gguf model.gguf] [--setup name=file.py]
        [--prompt 256] [--tokens 128] [--requests 3] [--workdir /big/disk]

A variant is NAME=TREE: a directory holding `braidinfer` and `braid_kernels` (a checkout, or `git archive` of one),
imported ahead of any installed copy; `.` is this checkout. Listing a tree again later (main, branch, main again)
shows how far the machine drifts during the run. `--setup NAME=FILE` runs FILE's Python in that variant's process
before the engine loads (a launch setting patched in, as `benchmarks/launch_costs.py` patches launches out).

Every variant loads the same GGUF file (--gguf, else the shape of --config written with random weights as
benchmarks/quantized_decode.py writes it, into a temporary directory), decodes one warm-up request, then --requests
greedy ignore_eos requests of --prompt random tokens and --tokens new ones, each timed as benchmarks/latency.py times
a request (first streamed token to last); the table gives each request's tok/s and their median.
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

HERE = os.path.dirname(os.path.abspath(__file__))

# The worker runs in the variant's process: its own `braidinfer` first on the path, this directory's helpers after.
WORKER = r"""
import json, sys
gguf, prompt, tokens, requests, setup, here = sys.argv[1:7]
if setup:
    exec(compile(open(setup).read(), setup, "exec"))
sys.path.append(here)
import braidinfer
from latency import one_sequence_decode_speeds
speeds = one_sequence_decode_speeds(gguf, int(prompt), int(tokens), int(requests), 0.3)
print(json.dumps({"tok_s": speeds, "braidinfer": braidinfer.__file__}), flush=True)
"""


def parse_pairs(text: str, what: str) -> list[tuple[str, str]]:
    """'a=x,b=y' -> [("a", "x"), ("b", "y")]."""
    pairs = []
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"{what}: expected NAME=VALUE, got {item!r}")
        pairs.append((name, value))
    return pairs


def run_variant(name: str, tree: str, setup: str, gguf: str, args) -> dict:
    """The worker's result for one variant, run in a process of its own with `tree` first on the import path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [tree, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-c", WORKER, gguf, str(args.prompt), str(args.tokens), str(args.requests), setup, HERE]
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"variant {name} ({tree}) failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1])
    expected = os.path.join(tree, "braidinfer")
    if not os.path.realpath(result["braidinfer"]).startswith(os.path.realpath(expected)):
        raise SystemExit(f"variant {name} imported {result['braidinfer']}, not the tree's {expected}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", required=True, help="NAME=TREE,... run in this order (names may repeat)")
    ap.add_argument("--setup", default="", help="NAME=FILE,...: Python run in that variant's process before the load")
    ap.add_argument("--config", default=os.path.join(HERE, "configs", "qwen3-8b.json"),
                    help="a published config.json, the shape of the random model (unless --gguf)")
    ap.add_argument("--format", default="Q4_K_M", choices=("Q4_K_M", "Q8_0"))
    ap.add_argument("--gguf", help="an existing GGUF file to load instead of writing a random one")
    ap.add_argument("--prompt", type=int, default=256, help="prompt length in tokens")
    ap.add_argument("--tokens", type=int, default=128, help="generated tokens per request")
    ap.add_argument("--requests", type=int, default=3, help="timed requests per variant, after a warm-up")
    ap.add_argument("--workdir", default=None, help="where the random GGUF file goes (default: the system's temp dir)")
    args = ap.parse_args()
    variants = [(name, os.path.abspath(tree)) for name, tree in parse_pairs(args.variants, "--variants")]
    setups = dict(parse_pairs(args.setup, "--setup"))
    for name, tree in variants:
        if not os.path.isdir(os.path.join(tree, "braidinfer")):
            raise SystemExit(f"variant {name}: {tree} holds no braidinfer package")
    unknown = set(setups) - {name for name, _ in variants}
    if unknown:
        raise SystemExit(f"--setup names no variant: {', '.join(sorted(unknown))}")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this compares GPU decode speeds")
    from latency import model_config
    from quantized_decode import write_random_gguf
    from throughput import device_name

    print(f"device: {device_name('cuda')}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="decode_ab-", dir=args.workdir) as workdir:
        gguf = args.gguf
        if gguf is None:
            tokenizer_dir = os.environ.get("BRAID_TEST_TOKENIZER")
            if tokenizer_dir is None:
                raise SystemExit("set BRAID_TEST_TOKENIZER to a saved tokenizer directory (or pass --gguf)")
            with open(args.config, encoding="utf-8") as f:
                shape = json.load(f)
            gguf = os.path.join(workdir, f"{args.format}.gguf")
            t0 = time.perf_counter()
            write_random_gguf(gguf, model_config("config.json", shape), args.format, tokenizer_dir, "cuda")
            print(f"{gguf} written in {time.perf_counter() - t0:.0f} s", flush=True)
        print(f"{args.prompt}-token prompt, {args.tokens} new tokens, {args.requests} requests a variant", flush=True)
        print(f"{'variant':<16}{'median tok/s':>14}  requests (tok/s)")
        for name, tree in variants:
            setup = os.path.abspath(setups[name]) if name in setups else ""
            speeds = run_variant(name, tree, setup, gguf, args)["tok_s"]
            print(f"{name:<16}{statistics.median(speeds):>14.1f}  {', '.join(f'{s:.1f}' for s in speeds)}",
                  flush=True)


if __name__ == "__main__":
    main()
