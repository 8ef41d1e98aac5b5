"""Offline throughput on the nano-vllm workload, Braid vs transformers' batched `generate`, same run: 256 requests of
random token ids, prompt and output lengths uniform in [100, 1024] (Python's `random`, seed 0, drawn exactly as
nano-vllm's bench.py draws them), temperature 0.6, ignore_eos; the figure is total output tok/s.

    BRAID_TEST_TOKENIZER=/path/to/tokenizer python benchmarks/throughput.py [--model qwen3-0.6b|smollm2-135m]
    BRAID_TEST_TOKENIZER=... python benchmarks/throughput.py --config benchmarks/configs/llama-3.1-8b.json \
        --formats bf16,Q4_K_M --skip-hf [--kernel-profile] [--step-profile]

--formats runs Braid on the same workload once per weight format: bf16 (safetensors), Q8_0 or Q4_K_M (a random GGUF
file of the same shape with llama.cpp's tensor types, as benchmarks/quantized_decode.py writes it; K-quant rows need
multiples of 256 columns), each printed against the bf16 row. Transformers runs the bf16 model only.
--kernel-profile prints, per format, the kernels of Braid's timed run by total GPU time (torch.profiler; kernels
launched with programmatic dependent launch count their wait for the kernel before them). --step-profile prints,
per format, the timed run's engine steps by path and new tokens (a decode step's rows): the time between CUDA events
around each step's launch (its GPU work, plus any wait for the host inside the launch), the GPU's idle time between
steps (waiting for the host; GPU work queued outside a launch, such as copying a composed prompt's chunks, counts
there too), and the host's time in each launch and in its forward.

Braid gets every request in one `llm.generate` call after a short warm-up (CUDA graphs are captured when the LLM is
built, FlashInfer and Triton compile on first use). Transformers runs the first --hf-requests of the same workload in
left-padded batches of --hf-batch-size, each generating the batch's longest output length for every row (the
ignore_eos equivalent). By default (--hf-order output) those requests are sorted by output length, then prompt length,
before batching, so that rows of a batch have similar lengths and little is padded; --hf-order prompt sorts by prompt
length, --hf-order given keeps the workload's order (with the default --hf-batch-size 64 and --hf-requests 64 there is
one batch and the order does not matter; --hf-batch-size 16 gives four length-sorted batches). Two ratios are
printed: output tok/s counting only each request's own output length for transformers (all of its time counts), and
counting every token transformers computed (padded rows generate up to their batch's longest output). Speed
does not depend on the weight values, so random weights stand in for the checkpoints (any tokenizer whose vocabulary
fits the model's will do). CPU smoke run, a tiny 2-layer model in float32, seconds:

    BRAID_TEST_TOKENIZER=/path/to/tokenizer python benchmarks/throughput.py --model tiny --device cpu \\
        --num-requests 4 --max-input-len 40 --max-output-len 20 --min-len 10 --hf-requests 4 --hf-batch-size 2
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import tempfile
import time

import torch
from latency import MODELS, build_model, model_config

TEMPERATURE = 0.6
FORMATS = ("bf16", "Q8_0", "Q4_K_M")


def write_gguf(path: str, arch: str, shape: dict, fmt: str, tokenizer_dir: str, device: str) -> None:
    """A random GGUF of the model `arch` / `shape` (as build_model takes them) in `fmt`, with llama.cpp's tensor
    types (benchmarks/quantized_decode.py)."""
    from quantized_decode import write_random_gguf

    write_random_gguf(path, model_config(arch, shape), fmt, tokenizer_dir, device)


def workload(args) -> tuple[list[list[int]], list[int]]:
    """Prompts (token ids) and output lengths, drawn in nano-vllm's bench.py order: all prompts, then all lengths."""
    random.seed(args.seed)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(args.min_len, args.max_input_len))]
               for _ in range(args.num_requests)]
    max_tokens = [random.randint(args.min_len, args.max_output_len) for _ in range(args.num_requests)]
    return prompts, max_tokens


def run_braid(path: str, prompts: list[list[int]], max_tokens: list[int], args) -> tuple[float, int]:
    """(seconds, output tokens) of one `generate` call over the whole workload."""
    from braidinfer import LLM, SamplingParams

    params = [SamplingParams(temperature=TEMPERATURE, ignore_eos=True, max_tokens=n) for n in max_tokens]
    with LLM(model=path, device=args.device, dtype=_dtype(args.device), max_num_seqs=args.max_num_seqs,
             max_num_batched_tokens=args.max_num_batched_tokens, progress=False) as llm:
        # Constant prompts, so the timed random ones find nothing of them in the prefix cache.
        llm.generate([[7] * 17, [8] * 300], SamplingParams(max_tokens=16, ignore_eos=True))
        steps = _StepProfile(llm.engine) if args.step_profile and args.device != "cpu" else None
        with _kernel_profile(args.kernel_profile and args.device != "cpu", os.path.basename(path)):
            t0 = time.perf_counter()
            outputs = llm.generate(prompts, params)
            elapsed = time.perf_counter() - t0
        if steps is not None:
            steps.report(os.path.basename(path), elapsed)
    del llm
    gc.collect()  # the LLM and its chunk store refer to each other; free its KV pool before transformers runs
    if args.device != "cpu":
        torch.cuda.empty_cache()
    return elapsed, sum(len(o.token_ids) for o in outputs)


@contextlib.contextmanager
def _kernel_profile(on: bool, name: str, top: int = 15):
    """With `on`, torch.profiler over the block (CUDA kernels), then the `top` kernels by total GPU time printed."""
    if not on:
        yield
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        yield
    events = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events)
    print(f"kernel profile, braid {name}: {total / 1e6:.2f} s of GPU kernel time", flush=True)
    for e in events[:top]:
        print(f"  {e.self_device_time_total / 1e6:8.3f} s {e.count:>9} launches  {e.key[:100]}", flush=True)


class _StepProfile:
    """Per engine step of the timed run: its new tokens (a decode step's rows), its path (decode graph, eager...),
    the time between CUDA events recorded around its launch, the GPU's idle time before it (the events of
    consecutive steps with nothing queued between them: time the GPU waited for the host), and the host's seconds in
    the launch and in the runner's forward within it. Wraps the engine's `_launch` and its runner's `run`."""

    def __init__(self, engine):
        self.records = []  # (new tokens, path kind, start event, end event, host seconds in the launch and its forward)
        launch, runner, run = engine._launch, engine.runner, engine.runner.run
        forward = [0.0]

        def timed_run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return run(*args, **kwargs)
            finally:
                forward[0] = time.perf_counter() - t0

        def timed(batch, in_flight):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            step = launch(batch, in_flight)
            end.record()
            if step is not None:
                self.records.append((sum(batch.num_new_tokens), runner.last_path.kind, start, end,
                                     time.perf_counter() - t0, forward[0]))
            return step

        runner.run = timed_run
        engine._launch = timed

    def report(self, name: str, elapsed: float) -> None:
        torch.cuda.synchronize()
        classes = {}  # (kind, tokens class) -> [steps, GPU ms, idle ms before, host s in launch, host s in forward]
        prev_end = None
        for tokens, kind, start, end, host, forward in self.records:
            key = (kind, next(f"<= {b}" for b in (1, 8, 64, 128, 256, 1 << 30) if tokens <= b))
            c = classes.setdefault(key, [0, 0.0, 0.0, 0.0, 0.0])
            c[0] += 1
            c[1] += start.elapsed_time(end)
            c[2] += prev_end.elapsed_time(start) if prev_end is not None else 0.0
            c[3] += host
            c[4] += forward
            prev_end = end
        busy, idle = sum(c[1] for c in classes.values()), sum(c[2] for c in classes.values())
        print(f"step profile, braid {name}: {len(self.records)} steps, {elapsed:.2f} s wall, {busy / 1e3:.2f} s "
              f"inside steps, {idle / 1e3:.2f} s between them", flush=True)
        for (kind, size), (n, gpu, gap, host, forward) in sorted(classes.items(), key=lambda kv: -kv[1][1]):
            print(f"  {kind:<14} tokens {size:<12} {n:>6} steps {gpu / 1e3:8.2f} s ({gpu / n:7.2f} ms each), "
                  f"{gap / 1e3:6.2f} s before them; host {1e3 * host / n:6.2f} ms a launch, "
                  f"{1e3 * forward / n:6.2f} of it in the forward", flush=True)


HF_ORDERS = {
    "given": None,
    "prompt": lambda prompt, n: (len(prompt), n),
    "output": lambda prompt, n: (n, len(prompt)),
}


def hf_order(prompts: list[list[int]], max_tokens: list[int], order: str) -> tuple[list[list[int]], list[int]]:
    """The requests in the order transformers batches them (see HF_ORDERS)."""
    key = HF_ORDERS[order]
    if key is None:
        return prompts, max_tokens
    pairs = sorted(zip(prompts, max_tokens), key=lambda pair: key(*pair))
    return [p for p, _ in pairs], [n for _, n in pairs]


def run_hf(model, prompts: list[list[int]], max_tokens: list[int], args) -> tuple[float, int]:
    """(seconds, generated tokens incl. the waste past each row's own length) of batched `generate`, summed over
    left-padded batches. The first batch runs once untimed first (all of it with --hf-static, which compiles for
    that shape; other shapes recompile inside the timing)."""
    elapsed, generated = 0.0, 0
    for i in range(0, len(prompts), args.hf_batch_size):
        batch, n = prompts[i:i + args.hf_batch_size], max(max_tokens[i:i + args.hf_batch_size])
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=args.device)  # (B, width)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=args.device)
        if i == 0:  # warm-up, untimed: the static cache compiles for this shape; the dynamic one only warms up
            hf_generate(model, ids, mask, n if args.hf_static else 2, args)
        t0 = time.perf_counter()
        hf_generate(model, ids, mask, n, args)
        elapsed += time.perf_counter() - t0
        generated += n * len(batch)
    return elapsed, generated


def hf_generate(model, ids: torch.Tensor, mask: torch.Tensor, n: int, args) -> None:
    """Exactly `n` sampled tokens for every row of the left-padded `ids` (B, T), `mask` (B, T) 0 on padding."""
    extra = {"cache_implementation": "static"} if args.hf_static else {}
    model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=True,
                   temperature=TEMPERATURE, top_k=0, eos_token_id=None, pad_token_id=0, **extra)
    if args.device != "cpu":
        torch.cuda.synchronize()


def _dtype(device: str) -> str:
    return "float32" if device == "cpu" else "bfloat16"


def device_name(device: str) -> str:
    if device == "cpu":
        return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return torch.cuda.get_device_name(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), default="qwen3-0.6b", help="'tiny' is for CPU smoke runs")
    ap.add_argument("--config", help="a published config.json (e.g. benchmarks/configs/llama-3.1-8b.json): its "
                                     "architecture and shape instead of --model's")
    ap.add_argument("--formats", default="bf16",
                    help=f"Braid's weight formats, comma-separated, of {', '.join(FORMATS)} (default bf16)")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--max-input-len", type=int, default=1024)
    ap.add_argument("--max-output-len", type=int, default=1024)
    ap.add_argument("--min-len", type=int, default=100, help="shortest prompt and output length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=256, help="Braid: most sequences per step")
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384, help="Braid: most tokens per forward")
    ap.add_argument("--hf-requests", type=int, default=64, help="transformers: the first this many requests")
    ap.add_argument("--hf-batch-size", type=int, default=64)
    ap.add_argument("--hf-order", choices=list(HF_ORDERS), default="output",
                    help="transformers: sort its requests by output (then prompt) length, by prompt (then output) "
                         "length, or keep the given order, before cutting them into batches")
    ap.add_argument("--hf-static", action="store_true", help="transformers: static cache (compiled decode)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kernel-profile", action="store_true",
                    help="profile Braid's timed run per format (torch.profiler, CUDA kernels): the top kernels by GPU "
                         "time; the run's seconds then include the profiler's overhead")
    ap.add_argument("--step-profile", action="store_true",
                    help="per format, Braid's timed run by engine step: new tokens and path (CUDA-graph decode, "
                         "eager), the time between events around each step's launch, the GPU's idle time between "
                         "steps, and the host's time per launch and per forward")
    args = ap.parse_args()
    tokenizer_dir = os.environ.get("BRAID_TEST_TOKENIZER")
    if not tokenizer_dir:
        raise SystemExit("needs BRAID_TEST_TOKENIZER (a saved tokenizer directory)")

    formats = args.formats.split(",")
    if not formats or any(fmt not in FORMATS for fmt in formats) or len(set(formats)) < len(formats):
        raise SystemExit(f"--formats takes distinct formats of {', '.join(FORMATS)}, got {args.formats!r}")
    import transformers

    if args.config:
        with open(args.config) as f:
            arch, shape, model_name = "config.json", json.load(f), os.path.basename(args.config).removesuffix(".json")
    else:
        (arch, shape), model_name = MODELS[args.model], args.model
    prompts, max_tokens = workload(args)
    rows = []  # (engine, requests, prompt tokens, output tokens, seconds)
    model = None
    with tempfile.TemporaryDirectory() as workdir:
        for fmt in formats:
            path = os.path.join(workdir, fmt if fmt == "bf16" else f"{fmt}.gguf")
            if fmt == "bf16":
                model = build_model(path, tokenizer_dir, arch, shape, args.device, getattr(torch, _dtype(args.device)))
            else:
                write_gguf(path, arch, shape, fmt, tokenizer_dir, args.device)
            seconds, num_out = run_braid(path, prompts, max_tokens, args)
            assert num_out == sum(max_tokens), f"Braid generated {num_out} tokens, expected {sum(max_tokens)}"
            rows.append((f"braid {fmt}", len(prompts), sum(map(len, prompts)), num_out, seconds))
        braid_rows = len(rows)
        if not args.skip_hf and model is not None:
            hf_prompts, hf_max_tokens = hf_order(prompts[:args.hf_requests], max_tokens[:args.hf_requests],
                                                 args.hf_order)
            seconds, generated = run_hf(model, hf_prompts, hf_max_tokens, args)
            cache = "static" if args.hf_static else "dynamic"
            rows.append((f"transformers generate ({cache} cache, batch {args.hf_batch_size}, {args.hf_order} order)",
                         len(hf_prompts), sum(map(len, hf_prompts)), sum(hf_max_tokens), seconds))

    print(f"device: {device_name(args.device)}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"model: {model_name} shape, random weights ({', '.join(formats)}; bf16 as {_dtype(args.device)}); "
          f"workload: {args.num_requests} requests, "
          f"prompt lengths in [{args.min_len}, {args.max_input_len}], output lengths in [{args.min_len}, "
          f"{args.max_output_len}], seed {args.seed}, temperature {TEMPERATURE}, ignore_eos")
    print(f"{'engine':<62}{'requests':>9}{'prompt tok':>11}{'output tok':>11}{'seconds':>9}"
          f"{'output tok/s':>14}{'total tok/s':>13}")
    for name, n, num_prompt, num_out, seconds in rows:
        print(f"{name:<62}{n:>9}{num_prompt:>11}{num_out:>11}{seconds:>9.2f}"
              f"{num_out / seconds:>14.1f}{(num_prompt + num_out) / seconds:>13.1f}")
    tps = {name: num_out / seconds for name, _, _, num_out, seconds in rows}
    if "bf16" in formats:
        for fmt in formats:
            if fmt != "bf16":
                print(f"ratio braid {fmt} / braid bf16, output tok/s: {tps[f'braid {fmt}'] / tps['braid bf16']:.2f}")
    if len(rows) > braid_rows:
        hf = rows[braid_rows]
        braid_tps, hf_tps = tps["braid bf16"], hf[3] / hf[4]
        print(f"transformers ran the first {hf[1]} requests only, in batches of {args.hf_batch_size} "
              f"({args.hf_order} order), Braid all {rows[0][1]} with up to {args.max_num_seqs} sequences per step; "
              f"transformers computed {generated} output tokens for their {hf[3]} (rows padded to their batch's "
              f"longest output)")
        print(f"ratio braid bf16 / transformers, output tok/s counting each request's own output: "
              f"{braid_tps / hf_tps:.2f}")
        print(f"ratio braid bf16 / transformers, output tok/s counting every token transformers computed: "
              f"{braid_tps / (generated / hf[4]):.2f}")


if __name__ == "__main__":
    main()
