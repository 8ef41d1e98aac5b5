"""Batch-1 decode speed of the embedded SmolLM2-135M on the CPU: Braid (weight_format "auto" and "dequantize") vs
transformers `generate` and, when llama-cpp-python is installed, llama.cpp on the same GGUF, same run.

    python benchmarks/cpu_decode.py [--tokens 128] [--repeats 3] [--decode-threads 2] [--context 1500]
                                    [--model FILE.gguf] [--requantize Q4_K_M]

--model times another GGUF file instead of the embedded one; --requantize first has llama.cpp's own quantiser
(llama-cpp-python's llama_model_quantize) rewrite the model in that file type, into a temporary file, so that a
llama.cpp type mix (for SmolLM2's 576-wide rows a Q4_K_M is mostly Q5_0) is timed on every engine.

On an AMX Xeon, llama-cpp-python 0.3.36 as pip builds it (GGML_NATIVE) crashed in its decode; a build with
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
-DGGML_AMX_BF16=OFF" runs (benchmarks/RESULTS.md).

Decode tok/s excludes the prefill: for Braid, the time from the first streamed token to the last; for transformers
and llama.cpp, the time of generating N tokens minus generating 1 token from the same prompt. Prefill is the time to
the first token (Braid with prefix caching off; transformers and llama.cpp: generating 1 token), best of the repeats.
"braid auto" uses Braid's CPU integer-dot kernels where they run (EngineConfig.cpu_native_kernels) and replays
their recorded calls in decode steps (braidinfer.cpu_graphs); "(eager layers)" runs the layers' Python every step
(enforce_eager); "(torch int4)"
is torch's int4 op instead, "(torch int4, decoded prefill)" that with EngineConfig.cpu_decoded_prefill on.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch


def braid_times(llm, prompt: list[int], n: int) -> tuple[float, float]:
    """(prefill seconds, decode tok/s) of one request of n tokens."""
    from braidinfer import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    start = time.perf_counter()
    stamps = [time.perf_counter() for chunk in llm.stream_deltas(prompt, params) if chunk.token_ids]
    return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def hf_times(model, prompt: list[int], n: int) -> tuple[float, float]:
    ids = torch.tensor([prompt])
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def timed(k):
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=k, min_new_tokens=k, **kw)
        return time.perf_counter() - t

    first = timed(1)
    return first, (n - 1) / (timed(n) - first)


def llamacpp_times(model, prompt: list[int], n: int) -> tuple[float, float]:
    def timed(k):
        model.reset()
        t = time.perf_counter()
        for i, _ in enumerate(model.generate(prompt, temp=0.0, reset=True)):
            if i + 1 == k:
                break
        return time.perf_counter() - t

    first = timed(1)
    return first, (n - 1) / (timed(n) - first)


def best(times: list[tuple[float, float]]) -> tuple[float, float]:
    """The shortest prefill and the fastest decode of several runs."""
    return min(t[0] for t in times), max(t[1] for t in times)


def load_llamacpp(gguf: str):
    """A llama_cpp.Llama on the file with as many threads as torch uses, or None when llama-cpp-python is absent."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    return Llama(gguf, n_ctx=2048, n_threads=torch.get_num_threads(), verbose=False)


def requantize(gguf: str, ftype: str, directory: str) -> str:
    """The GGUF `gguf` rewritten by llama.cpp's quantiser in file type `ftype` ("Q4_K_M", "Q5_K_M", ...) under
    `directory`; its path."""
    import ctypes

    import llama_cpp

    code = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}", None)
    if code is None:
        raise SystemExit(f"--requantize: llama.cpp has no file type {ftype!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = code, True, torch.get_num_threads()
    out = os.path.join(directory, f"{os.path.splitext(os.path.basename(gguf))[0]}.{ftype.upper()}.gguf")
    if llama_cpp.llama_model_quantize(gguf.encode(), out.encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"--requantize: llama.cpp could not write {out}")
    return out


def type_counts(gguf: str) -> str:
    """How many of the file's tensors have each GGML type, e.g. "166 Q5_0, 61 F32, ..."."""
    from collections import Counter

    from gguf import GGUFReader

    counts = Counter(t.tensor_type.name for t in GGUFReader(gguf).tensors)
    return ", ".join(f"{n} {name}" for name, n in counts.most_common())


def question(tokenizer, context: int) -> str:
    """The benchmark's user message: a question, after `context` tokens of Python source when context > 0."""
    ask = "Tell me a long story about a lighthouse."
    if context <= 0:
        return ask
    import inspect
    import typing

    ids = tokenizer.encode(inspect.getsource(typing), add_special_tokens=False)
    if len(ids) < context:
        raise SystemExit(f"--context: at most {len(ids)} tokens of text available")
    return tokenizer.decode(ids[:context]) + "\n\n" + ask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-threads", type=int, nargs="*", default=[],
                    help="also time weight_format auto with these cpu_decode_threads (the rows above use the default)")
    ap.add_argument("--context", type=int, default=0,
                    help="put about this many tokens of text (a stdlib module's source) before the question, so "
                         "that decode attends over a long context")
    ap.add_argument("--model", help="a GGUF file to time instead of the embedded model")
    ap.add_argument("--requantize", metavar="FTYPE",
                    help="rewrite the model with llama.cpp's quantiser in this file type first (e.g. Q4_K_M; needs "
                         "llama-cpp-python)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        gguf = args.model
        if gguf is None:
            from braidinfer.loader.embedded import default_model_path

            gguf = default_model_path()
        if args.requantize:
            gguf = requantize(gguf, args.requantize, directory)
        run(gguf, args)


def run(gguf: str, args) -> None:
    """Times every engine on the GGUF file `gguf` and prints the table."""
    from transformers import AutoModelForCausalLM

    from braidinfer import LLM

    print(f"model: {gguf} ({type_counts(gguf)})")
    rows: dict[str, tuple[float, float]] = {}  # name -> (prefill s, decode tok/s)
    prompt = None
    torch_int4 = dict(cpu_native_kernels=False)
    runs = {"braid auto": {}, "braid auto (eager layers)": dict(enforce_eager=True),
            "braid auto (torch int4)": torch_int4,
            "braid auto (torch int4, decoded prefill)": dict(torch_int4, cpu_decoded_prefill=True),
            "braid dequantize": dict(weight_format="dequantize")}
    runs.update({f"braid auto ({n} decode threads)": dict(cpu_decode_threads=n) for n in args.decode_threads})
    for name, kwargs in runs.items():
        with LLM(model=gguf, device="cpu", progress=False, enable_prefix_caching=False, **kwargs) as llm:
            prompt = llm.apply_chat_template([{"role": "user", "content": question(llm.tokenizer, args.context)}])
            braid_times(llm, prompt, 8)  # warm-up
            rows[name] = best([braid_times(llm, prompt, args.tokens) for _ in range(args.repeats)])
            weights = llm.memory_stats()["weight_bytes"]
            print("; ".join([f"{name}: {weights / 2**20:.0f} MiB of weights", *llm.load_summary[1:]]))
    # transformers and llama.cpp after Braid: their ops split over OpenMP threads on this (the main) thread, whose
    # worker team would then stay beside the engine thread's (braidinfer/step_threads.py, without_workers).
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf)).eval()
    hf_times(hf, prompt, 8)
    rows["transformers"] = best([hf_times(hf, prompt, args.tokens) for _ in range(args.repeats)])
    cpp = load_llamacpp(gguf)
    if cpp is not None:
        llamacpp_times(cpp, prompt, 8)
        rows["llama.cpp"] = best([llamacpp_times(cpp, prompt, args.tokens) for _ in range(args.repeats)])
    print(f"device: CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, fp32, prompt {len(prompt)} tokens, {args.tokens} new tokens, best of {args.repeats}")
    if cpp is None:
        print("llama.cpp: not measured (pip install llama-cpp-python)")
    print(f"{'engine':<34}{'decode tok/s':>14}{'prefill s':>12}")
    for name, (prefill, tps) in rows.items():
        print(f"{name:<34}{tps:>14.1f}{prefill:>12.3f}")
    for name in rows:
        if name != "braid auto":
            print(f"ratio braid auto/{name}: decode {rows['braid auto'][1] / rows[name][1]:.2f}, prefill time "
                  f"{rows['braid auto'][0] / rows[name][0]:.2f}")


if __name__ == "__main__":
    main()
