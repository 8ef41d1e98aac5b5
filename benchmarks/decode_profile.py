"""Where the time of one batch-1 decode step goes, for a Qwen3-0.6B-shaped model with random bf16 weights on CUDA.

    BRAID_TEST_TOKENIZER=/path/to/tokenizer python benchmarks/decode_profile.py [--context 512] [--steps 256]
        [--compare-gemv]

Prints, from the same run:
- the path each layer runs (LLMEngine.kernel_paths);
- the GPU time of the captured decode forward alone (graph replays back to back) and of the logits; with
  --compare-gemv also that of an engine with EngineConfig(gemv_decode=False): the fused kernels without the
  GEMV decode path;
- the engine's own step (schedule, forward, sample, detokenize) driven directly, without the loop thread;
- the same decode through `LLM.stream_deltas` (loop thread + channel to the caller), as users see it;
- a cProfile of the engine steps (the Python functions that cost the most).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import tempfile
import time

import torch

from latency import build_model, random_prompt


def gpu_replay_ms(engine, iters: int = 200) -> tuple[float, float]:
    """Milliseconds per replay of the batch-1 decode graph, and per logits computation, GPU-timed back to back."""
    graphs = engine.runner.graphs
    graph = graphs.graphs[1]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        graph.replay()
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    replay = start.elapsed_time(end) / iters
    hidden = graphs.hidden[:1]
    start.record()
    for _ in range(iters):
        engine.model.compute_logits(hidden)
    end.record()
    torch.cuda.synchronize()
    return replay, start.elapsed_time(end) / iters


def engine_steps(engine, prompt: list[int], steps: int, profile: cProfile.Profile | None = None) -> float:
    """Decode tok/s of one greedy request driven by calling engine.step() in this thread."""
    from braidinfer import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    seq = engine.requests.sequence(prompt, params)
    engine.add(seq)
    engine.step()  # prefill + first token
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if profile is not None:
        profile.enable()
    while engine.has_work():
        engine.step()
    if profile is not None:
        profile.disable()
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=512, help="prompt length in tokens")
    ap.add_argument("--steps", type=int, default=256, help="decode steps per measurement")
    ap.add_argument("--top", type=int, default=30, help="cProfile rows to print")
    ap.add_argument("--compare-gemv", action="store_true", help="also time the graph without the GEMV decode path")
    args = ap.parse_args()
    tokenizer_dir = os.environ.get("BRAID_TEST_TOKENIZER")
    if not tokenizer_dir or not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device and BRAID_TEST_TOKENIZER (a saved tokenizer directory)")

    from braidinfer import LLM, SamplingParams
    from braidinfer.config import EngineConfig
    from braidinfer.engine import LLMEngine

    with tempfile.TemporaryDirectory() as path:
        build_model(path, tokenizer_dir)  # saved to `path`; the transformers copy is dropped
        torch.cuda.empty_cache()
        pages = 4 * (args.context + args.steps) // 16 + 64
        config = EngineConfig(model=path, device="cuda", dtype="bfloat16", num_kv_pages=pages, progress=False)
        without_gemv = None
        if args.compare_gemv:
            engine = LLMEngine(config.model_copy(update={"gemv_decode": False}))
            engine_steps(engine, random_prompt(args.context, 1), 16)  # warm-up
            without_gemv = gpu_replay_ms(engine)
            del engine
            torch.cuda.empty_cache()
        engine = LLMEngine(config)
        kernel_paths = engine.kernel_paths
        engine_steps(engine, random_prompt(args.context, 1), 16)  # warm-up
        replay_ms, logits_ms = gpu_replay_ms(engine)
        direct = max(engine_steps(engine, random_prompt(args.context, 2 + r), args.steps) for r in range(2))
        profile = cProfile.Profile()
        engine_steps(engine, random_prompt(args.context, 9), args.steps, profile)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as trace:
            engine_steps(engine, random_prompt(args.context, 10), 16)
        kernels = trace.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.top)
        del engine
        torch.cuda.empty_cache()

        params = SamplingParams(temperature=0, max_tokens=args.steps, ignore_eos=True)
        with LLM(model=path, device="cuda", dtype="bfloat16", num_kv_pages=pages, progress=False) as llm:
            through_llm = 0.0
            for r in range(3):
                stamps = [time.perf_counter() for c in llm.stream_deltas(random_prompt(args.context, 20 + r), params)
                          if c.token_ids]
                through_llm = max(through_llm, (len(stamps) - 1) / (stamps[-1] - stamps[0]))

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; Qwen3-0.6B shape, random bf16, "
          f"context {args.context}, batch 1, greedy, CUDA graphs + fused kernels (defaults):")
    print("\n".join(f"  {line}" for line in kernel_paths))
    print(f"GPU only: graph replay {replay_ms:.3f} ms + logits {logits_ms:.3f} ms = "
          f"{1e3 / (replay_ms + logits_ms):.0f} tok/s ceiling")
    if without_gemv is not None:
        print(f"GPU only, without the GEMV decode path: graph replay {without_gemv[0]:.3f} ms + logits "
              f"{without_gemv[1]:.3f} ms = {1e3 / sum(without_gemv):.0f} tok/s ceiling")
    print(f"engine.step() driven directly: {direct:.1f} tok/s ({1e3 / direct:.3f} ms/step)")
    print(f"LLM.stream_deltas (loop thread + channel): {through_llm:.1f} tok/s ({1e3 / through_llm:.3f} ms/step)")
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.top)
    print(out.getvalue())
    print("torch.profiler over 16 engine steps, by GPU time:")
    print(kernels)


if __name__ == "__main__":
    main()
