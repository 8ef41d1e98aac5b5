"""Batch-1 latency on CUDA for a Qwen3-0.6B- or SmolLM2-135M-shaped model with random bf16 weights: time to first
token and decode speed at several prompt lengths, for Braid with each attention backend and transformers `generate`,
same run.

    BRAID_TEST_TOKENIZER=/path/to/tokenizer python benchmarks/latency.py [--model qwen3-0.6b|smollm2-135m]
        [--config benchmarks/configs/mistral-7b-v0.1.json] [--lengths 512,4096,16384] [--tokens 128] [--repeats 3]

--config takes a published config.json (any architecture the engine supports) instead of --model: random weights of
that exact shape.

TTFT is the time from submitting the prompt to receiving the first generated token (fresh random prompts, so nothing
comes from the prefix cache). Decode tok/s is measured from the first streamed token to the last. Every engine, Braid
and transformers alike, runs one warm-up request and then --repeats timed ones per prompt length; the row reports the
timed run with the highest decode tok/s, with that same run's TTFT (each pair comes from one request).
The bandwidth limit is the fastest batch-1 decode can be if every token reads all weights (and, second figure, the whole KV cache) once
at the measured device copy bandwidth. Speed does not depend on the weight values, so random weights stand in for
the real checkpoint (the tokenizer only has to be saved beside them).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  tie_word_embeddings=True, rope_theta=1_000_000.0, bos_token_id=1, eos_token_id=2)


SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192,
                "tie_word_embeddings": True, "rope_theta": 100_000.0, "rms_norm_eps": 1e-5}
TINY = {**SMOLLM2_135M, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}  # for CPU smoke runs
MODELS = {"qwen3-0.6b": ("Qwen3", QWEN3_0_6B), "smollm2-135m": ("Llama", SMOLLM2_135M), "tiny": ("Llama", TINY)}


def model_config(arch: str, shape: dict):
    """The transformers config of `arch` ("Qwen3" or "Llama") at `shape`, or with arch "config.json" of a published
    config's entries (its model_type picks the architecture; keys starting with "_" are left out)."""
    import transformers

    if arch == "config.json":
        return transformers.AutoConfig.for_model(**{k: v for k, v in shape.items() if not k.startswith("_")})
    return getattr(transformers, f"{arch}Config")(**shape)


def build_model(path: str, tokenizer_dir: str, arch: str = "Qwen3", shape: dict = QWEN3_0_6B,
                device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """A random transformers model (`arch`: "Qwen3" or "Llama", of `shape`, or "config.json": see model_config) on
    `device`, saved with the tokenizer to `path`; returns it. The default is the Qwen3-0.6B shape in bf16 on CUDA."""
    import transformers

    torch.manual_seed(0)
    config = model_config(arch, shape)
    with torch.device(device):
        if arch == "config.json":
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        else:
            model = getattr(transformers, f"{arch}ForCausalLM")(config).to(dtype).eval()
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return model


def copy_bandwidth(nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * nbytes * iters / (start.elapsed_time(end) / 1e3)


def time_graph(step, replays: int = 20) -> float:
    """Microseconds per replay of a CUDA graph of `step()` (warmed up eagerly first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / replays


PROMPT_VOCAB = 32000  # prompt ids are drawn below every benchmarked model's vocabulary (Mistral's is 32,000)


def random_prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, PROMPT_VOCAB, (n,), generator=g).tolist()


def braid_latency(llm, prompt: list[int], n: int) -> tuple[float, float]:
    """(TTFT seconds, decode tok/s) of one streamed greedy request."""
    from braidinfer import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    t0 = time.perf_counter()
    stamps = [time.perf_counter() for chunk in llm.stream_deltas(prompt, params) if chunk.token_ids]
    return stamps[0] - t0, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def one_sequence_decode_speeds(model: str, prompt: int, tokens: int, requests: int,
                               gpu_memory_utilization: float) -> list[float]:
    """Decode tok/s of `requests` greedy ignore_eos requests of `prompt` random tokens and `tokens` new ones (each
    timed as braid_latency times it), after a 16-token warm-up, on an engine of one sequence loaded from `model`."""
    from braidinfer import LLM, SamplingParams

    with LLM(model=model, dtype="bfloat16", max_num_seqs=1, max_model_len=prompt + tokens + 16,
             gpu_memory_utilization=gpu_memory_utilization, progress=False) as llm:
        llm.generate([random_prompt(prompt, 0)], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
        return [braid_latency(llm, random_prompt(prompt, seed=r + 1), tokens)[1] for r in range(requests)]


class _Stamps:
    """A `generate` streamer that only records when each step's tokens arrive (the first call is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_latency(model, prompt: list[int], n: int, static: bool) -> tuple[float, float]:
    ids = torch.tensor([prompt], device="cuda")
    stamps = _Stamps()
    extra = dict(cache_implementation="static") if static else {}
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                   streamer=stamps, **extra)
    t = stamps.times[1:]
    return t[0] - t0, (len(t) - 1) / (t[-1] - t[0])


def best(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """The (TTFT, decode tok/s) run with the highest decode tok/s: both figures from that one request."""
    return max(runs, key=lambda run: run[1])


BRAID_VARIANTS = {
    "braid, engine defaults": dict(),  # what LLM(model=...) picks, falling back (and saying so) where a path can't run
    "braid, torch attention": dict(attention_backend="torch", fused_kernels=False, enforce_eager=True),
    "braid, flashinfer attention": dict(attention_backend="flashinfer", fused_kernels=False, enforce_eager=True),
    "braid, flashinfer + fused kernels": dict(attention_backend="flashinfer", fused_kernels=True, enforce_eager=True),
    "braid, flashinfer + CUDA graphs": dict(attention_backend="flashinfer", fused_kernels=False, enforce_eager=False),
    "braid, flashinfer + fused kernels + CUDA graphs": dict(attention_backend="flashinfer", fused_kernels=True,
                                                             enforce_eager=False),
}


def measure_braid(path: str, engine_kwargs: dict, lengths: list[int], n: int, repeats: int) -> dict[int, tuple]:
    from braidinfer import LLM

    pages = 4 * (max(lengths) + n) // 16 + 64
    out = {}
    with LLM(model=path, device="cuda", dtype="bfloat16", num_kv_pages=pages, progress=False, **engine_kwargs) as llm:
        for length in lengths:
            braid_latency(llm, random_prompt(length, seed=length), 8)  # warm-up (and FlashInfer's JIT)
            out[length] = best([braid_latency(llm, random_prompt(length, seed=length + r + 1), n)
                                for r in range(repeats)])
    return out


def measure_hf(model, lengths: list[int], n: int, repeats: int) -> dict[int, tuple]:
    """Static cache (compiled decode) where it works; each prompt length is a new cache shape, so a warm-up run of the
    same length and token count comes first, then the best of `repeats` runs as for Braid. Falls back to the default
    dynamic cache."""
    out = {}
    for length in lengths:
        for static in (True, False):
            try:
                hf_latency(model, random_prompt(length, seed=length), n, static)
                runs = [hf_latency(model, random_prompt(length, seed=length + r + 1), n, static)
                        for r in range(repeats)]
                out[length] = (*best(runs), static)
                break
            except Exception as e:  # noqa: BLE001 - any failure of the static path falls back to the default cache
                print(f"transformers static cache failed at {length} tokens ({type(e).__name__}: {e}); default cache")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=[m for m in MODELS if m != "tiny"], default="qwen3-0.6b")
    ap.add_argument("--config", help="a published config.json (e.g. benchmarks/configs/*.json) instead of --model")
    ap.add_argument("--lengths", default="512,4096,16384", help="prompt lengths in tokens, comma-separated")
    ap.add_argument("--tokens", type=int, default=128, help="generated tokens per request")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed requests per length, for Braid and transformers alike; each row reports the one with "
                         "the highest decode tok/s, with its own TTFT")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--variants", default=";".join(BRAID_VARIANTS),
                    help="semicolon-separated Braid configurations to run, from: " + "; ".join(BRAID_VARIANTS))
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    tokenizer_dir = os.environ.get("BRAID_TEST_TOKENIZER")
    if not tokenizer_dir or not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device and BRAID_TEST_TOKENIZER (a saved tokenizer directory)")

    import transformers

    from braidinfer.attention.flashinfer_backend import unsupported_reason

    with tempfile.TemporaryDirectory() as path:
        if args.config:
            with open(args.config, encoding="utf-8") as f:
                arch, shape = "config.json", json.load(f)
            model_name = os.path.basename(args.config).removesuffix(".json")
        else:
            (arch, shape), model_name = MODELS[args.model], args.model
        model = build_model(path, tokenizer_dir, arch, shape)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied lm_head counted once
        bandwidth = copy_bandwidth()
        rows = {}
        head_dim = _head_dim(shape)
        problem = unsupported_reason(torch.device("cuda"), torch.bfloat16, head_dim)
        for name in args.variants.split(";"):
            kwargs = BRAID_VARIANTS[name]
            if problem is not None and kwargs.get("attention_backend") == "flashinfer":
                print(f"skipping {name}: {problem}")
                continue
            rows[name] = measure_braid(path, kwargs, lengths, args.tokens, args.repeats)
        if not args.no_transformers:
            hf = measure_hf(model, lengths, args.tokens, args.repeats)
            for length, (ttft, tps, static) in hf.items():
                name = f"transformers generate ({'static' if static else 'dynamic'} cache)"
                rows.setdefault(name, {})[length] = (ttft, tps)

    c = shape
    num_kv_heads = c.get("num_key_value_heads") or c.get("num_attention_heads") or c["n_head"]
    kv_bytes_per_token = 2 * (c.get("num_hidden_layers") or c["n_layer"]) * num_kv_heads * head_dim * 2
    fi_version = "absent" if problem else __import__("flashinfer").__version__
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, flashinfer {fi_version}")
    print(f"model: {model_name} shape, random bf16 weights ({weight_bytes / 1e9:.3f} GB), batch 1, {args.tokens} new "
          f"tokens, greedy; device copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"each row: of {args.repeats} timed requests after a warm-up, the one with the highest decode tok/s and its "
          f"own TTFT")
    print(f"{'prompt':>7}  {'engine':<50}{'TTFT ms':>10}{'decode tok/s':>14}")
    for length in lengths:
        for name, results in rows.items():
            if length in results:
                ttft, tps = results[length]
                print(f"{length:>7}  {name:<50}{ttft * 1e3:>10.1f}{tps:>14.1f}")
        kv = kv_bytes_per_token * (length + args.tokens // 2)
        print(f"{length:>7}  {'bandwidth limit (weights / weights + KV)':<50}{'':>10}"
              f"{bandwidth / weight_bytes:>7.0f} / {bandwidth / (weight_bytes + kv):.0f}")


def _head_dim(shape: dict) -> int:
    if shape.get("head_dim"):
        return shape["head_dim"]
    hidden, heads = shape.get("hidden_size") or shape["n_embd"], shape.get("num_attention_heads") or shape["n_head"]
    return hidden // heads


if __name__ == "__main__":
    main()
