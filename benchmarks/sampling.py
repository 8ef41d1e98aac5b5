"""What picking the next token costs a decode step: Braid's sampler beside transformers' sampling (its logits warpers,
softmax and torch.multinomial, as `generate(do_sample=True)` runs them), same logits, same run.

    python benchmarks/sampling.py [--vocab 151936] [--batches 1,8,64,256] [--repeats 50] [--device cuda] [--profile]

Every row of a batch has the same settings (one table row each): greedy, temperature alone, top-k, top-p (a sort of
the whole vocabulary), top-k with top-p, min-p. The rows share one generator, as the engine's unseeded requests do.
The logits are float32 random normals times 3 (a spread like a model's), made once per batch size. Times are the
median of --repeats calls after a warm-up, measured with CUDA events on a GPU (the GPU's time from the first launch to
the last kernel's end, host launch time included where the GPU waits for it) and with the wall clock on the CPU.
--profile (CUDA) gives the GPU's kernel time instead: the kernels' device time under torch.profiler over --repeats
calls, per call, host launch time left out.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from throughput import device_name
from torch.profiler import ProfilerActivity, profile
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from braidinfer.sampling.sampler import Sampler, make_generator
from braidinfer.sampling_params import SamplingParams

SETTINGS = {
    "greedy": {"temperature": 0.0},
    "temperature 0.7": {"temperature": 0.7},
    "top-k 50": {"temperature": 0.7, "top_k": 50},
    "top-p 0.9": {"temperature": 0.7, "top_p": 0.9},
    "top-k 50 + top-p 0.95": {"temperature": 0.7, "top_k": 50, "top_p": 0.95},
    "min-p 0.05": {"temperature": 0.7, "min_p": 0.05},
}


def transformers_sample(logits: torch.Tensor, settings: dict, generator: torch.Generator) -> torch.Tensor:
    """The next token of every row as transformers' sampling picks it (argmax where greedy)."""
    if settings["temperature"] == 0.0:
        return logits.argmax(dim=-1)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(settings["temperature"])])
    if settings.get("top_k", 0) > 0:
        warpers.append(TopKLogitsWarper(settings["top_k"]))
    if settings.get("top_p", 1.0) < 1.0:
        warpers.append(TopPLogitsWarper(settings["top_p"]))
    if settings.get("min_p", 0.0) > 0.0:
        warpers.append(MinPLogitsWarper(settings["min_p"]))
    scores = warpers(None, logits)
    return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)


def time_ms(fn, repeats: int, device: torch.device) -> float:
    """Median milliseconds of fn() over `repeats` calls, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def kernel_ms(fn, repeats: int) -> float:
    """Milliseconds of CUDA kernel time per fn() call under torch.profiler, over `repeats` calls after two warm-ups."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    return sum(event.self_device_time_total for event in prof.key_averages()) / repeats / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=151_936, help="logits per row (Qwen3's vocabulary by default)")
    ap.add_argument("--batches", default="1,8,64,256", help="rows per step, comma-separated")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", action="store_true", help="CUDA kernel time per call instead of the elapsed time")
    args = ap.parse_args()
    if args.vocab < 2 or args.repeats < 1:
        ap.error("--vocab must be at least 2 and --repeats at least 1")
    if args.profile and not args.device.startswith("cuda"):
        ap.error("--profile measures CUDA kernels: it needs --device cuda")
    batches = [int(b) for b in args.batches.split(",")]
    device = torch.device(args.device)
    sampler = Sampler()
    generator = make_generator(0, device)

    def measure(fn) -> float:
        return kernel_ms(fn, args.repeats) if args.profile else time_ms(fn, args.repeats, device)

    what = f"kernel time per call over {args.repeats} calls" if args.profile else f"median of {args.repeats} calls"
    print(f"device: {device_name(args.device)}; vocabulary {args.vocab:,}; {what}, ms")
    print(f"{'setting':<24}{'rows':>6}{'Braid':>10}{'transformers':>14}{'ratio':>8}")
    for batch in batches:
        logits = torch.randn(batch, args.vocab, generator=torch.Generator().manual_seed(batch)).mul_(3).to(device)
        for name, settings in SETTINGS.items():
            params = [SamplingParams(**settings)] * batch
            generators = [generator] * batch
            braid = measure(lambda: sampler(logits, params, generators).token_ids)
            reference = measure(lambda: transformers_sample(logits, settings, generator))
            print(f"{name:<24}{batch:>6}{braid:>10.3f}{reference:>14.3f}{braid / reference:>8.2f}")


if __name__ == "__main__":
    main()
