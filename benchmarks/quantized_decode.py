"""Quantised GGUF weights against the bf16 model of the same shape, same run: weight memory, batch-1 decode speed and
batched throughput for random weights of an 8B shape (Qwen3-8B by default) written as bf16 safetensors, Q8_0 GGUF and
Q4_K_M GGUF (issue 15's targets: batch-1 decode Q4_K_M >= 2.5x bf16 and Q8_0 >= 1.7x; Q4_K_M weights <= 32% of
bf16; throughput Q4_K_M >= 0.8x bf16).

    BRAID_TEST_TOKENIZER=/path/to/tokenizer python benchmarks/quantized_decode.py
        [--config benchmarks/configs/llama-3.1-8b.json] [--formats bf16,Q8_0,Q4_K_M,Q4_K_M:dequantize]
        [--prompt 256] [--tokens 128] [--batch 128] [--batch-prompt 128] [--repeats 3] [--workdir /big/disk]
        [--layers 8] [--kernel-profile] [--keep-models /big/disk/models]
    python benchmarks/quantized_decode.py --tiny --device cpu     # CPU smoke run of every code path, ~1 minute

Columns: `weight GB` is llm.memory_stats()["weight_bytes"] (quantised tensors count their GGUF blocks); `batch-1
tok/s` is the decode speed of one greedy ignore_eos request (--prompt random token ids, --tokens new tokens), from
the first streamed token to the last, best of --repeats after a warm-up, as benchmarks/latency.py measures it; `x bf16`
divides by the bf16 row; `batch N tok/s` is output tokens per second of one `generate` call over N requests of
--batch-prompt random tokens, each generating --tokens (greedy, ignore_eos), best of --repeats after a warm-up call of
the same shape (as benchmarks/throughput.py counts it); `limit tok/s` is the fastest batch-1 decode could be if each
token read every weight byte once at the device's measured copy bandwidth (latency.copy_bandwidth), and `% limit` the
batch-1 speed's share of it. "FORMAT:dequantize" loads the same GGUF with weight_format="dequantize" (bf16 at load).

The models are random: bf16 from transformers' init (latency.build_model); the GGUF files hold random quant bytes
with every fp16 scale 0.01 (quant_kernels.random_blocks) and float32 norms of one, under llama.cpp's tensor names and
metadata. Speed does not depend on the values. Q4_K_M is llama.cpp's mix (llama_tensor_get_type): output Q6_K,
attn_v and ffn_down Q6_K on the layers its use_more_bits picks (the first and last eighth, every third between:
half of them), everything else, token_embd included, Q4_K; Q8_0 stores every matrix Q8_0. Every model carries the
tokenizer saved in BRAID_TEST_TOKENIZER (the GGUF files as llama.cpp writes a byte-level BPE tokenizer's metadata;
without the variable, the embedded model's tokenizer, converted); the GGUF's vocabulary size comes from its
`{arch}.vocab_size` key, and prompt ids stay below 32,000 (latency.random_prompt). Each model file is written in
--workdir just before its engine loads it and deleted after (peak disk: the bf16 model, 16 GB at 8B); with
--keep-models DIR they are written in DIR instead, kept, and read from there by later runs of the same shape (two
source trees compared on one machine, each with its own bf16 row, without writing the files twice; peak disk ~30 GB
at 8B).
--layers N keeps the config's first N decoder layers (a quicker run of the same per-layer shapes); --kernel-profile
adds, per format, the kernels of one more batch-1 generation by GPU time per generated token (torch.profiler; the
prompt's prefill included), to see which kernels a format spends its token on. On sm_90+ the package's kernels
run with programmatic dependent launch, and a kernel's time then includes its wait for the one before it.
--tiny runs the config's architecture at a tiny shape, 64-token prompt, 16 new tokens, batch 8 of 32-token prompts,
best of 2, unless those options are given.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from latency import best, braid_latency, build_model, copy_bandwidth, model_config, random_prompt
from throughput import device_name

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, for tests.support
from quant_kernels import random_blocks

from tests.support.gguf_export import add_shape_metadata

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 16384,
        "bos_token_id": 1, "eos_token_id": 2}
"""--tiny: the config's architecture at a CPU-sized shape (K-quant rows need multiples of 256 columns)."""
DEFAULT_RUN = {"prompt": 256, "tokens": 128, "batch": 128, "batch_prompt": 128, "repeats": 3}
TINY_RUN = {"prompt": 64, "tokens": 16, "batch": 8, "batch_prompt": 32, "repeats": 2}
FORMATS = ("bf16", "Q8_0", "Q4_K_M")
FILE_TYPES = {"Q8_0": "MOSTLY_Q8_0", "Q4_K_M": "MOSTLY_Q4_K_M"}


def use_more_bits(i_layer: int, num_layers: int) -> bool:
    """llama.cpp's use_more_bits: the layers whose attn_v / ffn_down get Q6_K in a Q4_K_M file."""
    return i_layer < num_layers // 8 or i_layer >= 7 * num_layers // 8 or (i_layer - num_layers // 8) % 3 == 2


def qtype_of(fmt: str, gguf_name: str, num_layers: int) -> str:
    """The GGML type `fmt` ("Q8_0" or "Q4_K_M") stores the matrix `gguf_name` in."""
    if fmt == "Q8_0":
        return "Q8_0"
    if gguf_name == "output.weight":
        return "Q6_K"
    m = re.fullmatch(r"blk\.(\d+)\.(attn_v|ffn_down)\.weight", gguf_name)
    return "Q6_K" if m and use_more_bits(int(m[1]), num_layers) else "Q4_K"


def gguf_tensors(config, fmt: str) -> list[tuple[str, tuple[int, ...], str | None]]:
    """(GGUF name, HF shape, GGML type or None for float32) of every tensor of `config`'s model in `fmt`, in
    transformers' order, under llama.cpp's names."""
    import gguf
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == config.model_type)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tensors = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        qtype = qtype_of(fmt, name, config.num_hidden_layers) if tensor.ndim == 2 else None
        tensors.append((name, tuple(tensor.shape), qtype))
    return tensors


def add_tokenizer(writer, tokenizer_dir: str) -> None:
    """The tokenizer metadata llama.cpp writes for a byte-level BPE tokenizer ("gpt2": tokens, types, merges, special
    ids, chat template), from a saved transformers tokenizer, by the gguf package's own vocabulary readers."""
    from pathlib import Path

    import gguf

    vocab = gguf.vocab.BpeVocab(Path(tokenizer_dir))
    tokens, scores, types = zip(*vocab.all_tokens())
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.vocab.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab.vocab_size).add_to_gguf(writer, quiet=True)


def write_random_gguf(path: str, config, fmt: str, tokenizer_dir: str, device: str) -> None:
    """A GGUF of `config`'s shape in `fmt`: random blocks for matrices, float32 ones for norms, llama.cpp's names
    and metadata, the tokenizer saved in `tokenizer_dir`. Tensors are generated and written one at a time.
    llama.cpp's q/k row permutation is left out: it only reorders random rows."""
    import gguf

    torch.manual_seed(0)
    tensors = gguf_tensors(config, fmt)
    fixed = {}  # float32 tensors with values of their own
    rope_freqs = llama3_rope_freqs(config)
    if rope_freqs is not None:  # llama.cpp stores Llama 3 rope scaling as this tensor, not as metadata
        fixed["rope_freqs.weight"] = rope_freqs
        tensors.append(("rope_freqs.weight", rope_freqs.shape, None))
    writer = gguf.GGUFWriter(path, config.model_type)
    writer.add_name(f"random {config.model_type} {fmt}")
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[fmt]])
    add_shape_metadata(writer, config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if config.model_type == "llama":
        writer.add_rope_dimension_count(head_dim)
    else:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    add_tokenizer(writer, tokenizer_dir)
    for name, shape, qtype in tensors:
        if qtype is None:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * math.prod(shape))
            continue
        block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
        row_bytes = shape[1] // block_size * type_size  # GGUF stores the byte shape reversed, converted to elements
        writer.add_tensor_info(name, (shape[0], row_bytes), np.dtype(np.uint8), shape[0] * row_bytes,
                               raw_dtype=gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, shape, qtype in tensors:
        if qtype is not None:
            writer.write_tensor_data(random_blocks(qtype, shape[0], shape[1], device).cpu().numpy())
        else:
            writer.write_tensor_data(fixed.get(name, np.ones(shape, dtype=np.float32)))
    writer.close()


def llama3_rope_freqs(config) -> np.ndarray | None:
    """The rope_freqs tensor llama.cpp's converter writes for a llama3 `rope_scaling`, else None."""
    from braidinfer.loader.gguf_rope import llama3_divisors

    scaling = config.rope_parameters
    if scaling.get("rope_type") != "llama3":
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = config.rope_parameters["rope_theta"]
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return llama3_divisors(scaling, wavelen).astype(np.float32)


def measure(path: str, fmt: str, args) -> dict:
    """Loads `path` in one engine and measures it: weight bytes, batch-1 decode tok/s, batch throughput tok/s."""
    from braidinfer import LLM, SamplingParams

    weight_format = "dequantize" if fmt.endswith(":dequantize") else "auto"
    greedy = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    with LLM(model=path, device=args.device, dtype="float32" if args.device == "cpu" else "bfloat16",
             weight_format=weight_format, max_num_seqs=args.batch, max_num_batched_tokens=16384,
             max_model_len=max(args.prompt, args.batch_prompt) + args.tokens + 16,
             gpu_memory_utilization=args.gpu_memory_utilization, progress=False) as llm:
        paths = [p for p in llm.engine.kernel_paths if "quant" in p or p.startswith(("attention", "fallback"))]
        row = {"weight_bytes": llm.memory_stats()["weight_bytes"], "notes": llm.load_summary + paths}
        # A warm-up, which also shows that the random weights compute finite logits.
        probe = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
        out = llm.generate([random_prompt(args.prompt, 0)], probe)[0]
        finite = all(math.isfinite(lp.logprob) for lp in out.logprobs)
        row["notes"].append(f"first ids {out.token_ids}, logprobs {'finite' if finite else 'NOT FINITE'}")
        row["batch1"] = best([braid_latency(llm, random_prompt(args.prompt, seed=r + 1), args.tokens)
                              for r in range(args.repeats)])[1]
        if args.kernel_profile:
            row["notes"] += kernel_profile(llm, args)
        runs = []
        for r in range(args.repeats + 1):  # the first call warms up every kernel and graph of this batch shape
            prompts = [random_prompt(args.batch_prompt, seed=1000 * (r + 1) + i) for i in range(args.batch)]
            t0 = time.perf_counter()
            outputs = llm.generate(prompts, greedy)
            runs.append(sum(len(o.token_ids) for o in outputs) / (time.perf_counter() - t0))
        row["batch"] = max(runs[1:])
    del llm
    gc.collect()  # the LLM and its chunk store refer to each other; free its memory before the next engine
    if args.device != "cpu":
        torch.cuda.empty_cache()
    return row


def kernel_profile(llm, args, top: int = 15) -> list[str]:
    """The kernels of one batch-1 greedy generation (--prompt tokens, then --tokens new ones) by GPU time, from
    torch.profiler: total and the `top` kernels, each in microseconds and launches per generated token."""
    from braidinfer import SamplingParams

    if args.device == "cpu":
        return ["kernel profile: CUDA only (the engine thread's CPU ops are not recorded)"]
    greedy = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        llm.generate([random_prompt(args.prompt, seed=99)], greedy)
    events = list(prof.key_averages())
    total = sum(e.self_device_time_total for e in events)
    n = args.tokens
    lines = [f"kernel profile (prefill included): {total / n:.1f} us of GPU time per generated token"]
    for e in sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:top]:
        lines.append(f"  {e.self_device_time_total / n:8.1f} us/token {e.count / n:6.1f}/token  {e.key[:100]}")
    return lines


def model_file(fmt: str, config, shape: dict, workdir: str, tokenizer_dir: str, args) -> str:
    """The path of the model of `fmt` ("bf16", "Q8_0", "Q4_K_M") in `workdir`, written there unless it is already."""
    path = os.path.join(workdir, "bf16" if fmt == "bf16" else f"{fmt}.gguf")
    if os.path.exists(path):
        return path
    partial = path + ".partial"  # renamed once complete: an interrupted write is never taken for a model
    remove(partial)
    if fmt == "bf16":
        dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
        model = build_model(partial, tokenizer_dir, "config.json", shape, args.device, dtype)
        del model
        gc.collect()
        if args.device != "cpu":
            torch.cuda.empty_cache()
    else:
        write_random_gguf(partial, config, fmt, tokenizer_dir, args.device)
    os.replace(partial, path)
    return path


def _shape_name(shape: dict) -> str:
    """A folder name for the model files of `shape` (a config, after --tiny and --layers): its architecture and a
    hash of its fields, so that kept files are only reused for the same shape."""
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]
    return f"{shape.get('model_type', 'model')}-{digest}"


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def run(args, shape: dict, tokenizer_dir: str | None) -> tuple[dict, float | None]:
    """Every format's row, and the device copy bandwidth (None on the CPU)."""
    import transformers

    config = model_config("config.json", shape)
    bandwidth = copy_bandwidth() if args.device != "cpu" else None
    formats = args.formats.split(",")
    rows = {}
    with contextlib.ExitStack() as stack:
        if args.keep_models is not None:
            workdir = os.path.join(args.keep_models, _shape_name(shape))
            os.makedirs(workdir, exist_ok=True)
        else:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="quantized_decode-", dir=args.workdir))
        if tokenizer_dir is None:  # the embedded model's, as transformers converts it
            from braidinfer.loader import default_model_path

            tokenizer_dir = os.path.join(workdir, "tokenizer")
            directory, file = os.path.split(default_model_path())
            transformers.AutoTokenizer.from_pretrained(directory, gguf_file=file).save_pretrained(tokenizer_dir)
        for i, fmt in enumerate(formats):
            base = fmt.split(":")[0]
            t0 = time.perf_counter()
            path = model_file(base, config, shape, workdir, tokenizer_dir, args)
            print(f"{fmt}: {path} ready in {time.perf_counter() - t0:.0f} s", flush=True)
            t0 = time.perf_counter()
            rows[fmt] = measure(path, fmt, args)
            row = rows[fmt]
            print(f"{fmt}: measured in {time.perf_counter() - t0:.0f} s: {row['weight_bytes'] / 1e9:.2f} GB, batch-1 "
                  f"{row['batch1']:.1f} tok/s, batch {args.batch} {row['batch']:.1f} tok/s", flush=True)
            for note in rows[fmt]["notes"]:
                print(f"  {note}", flush=True)
            if args.keep_models is None and all(f.split(":")[0] != base for f in formats[i + 1:]):
                remove(path)
    return rows, bandwidth


def print_table(rows: dict, bandwidth: float | None, args) -> None:
    ref = rows.get("bf16")
    batch_col = f"batch {args.batch} tok/s"
    print(f"{'weights':<20}{'weight GB':>10}{'batch-1 tok/s':>15}{'x bf16':>8}{batch_col:>18}{'x bf16':>8}"
          f"{'limit tok/s':>13}{'% limit':>9}")
    for fmt, row in rows.items():
        nbytes = row["weight_bytes"]
        limit = bandwidth / nbytes if bandwidth else None
        share = "n/a" if limit is None else f"{100 * row['batch1'] / limit:.0f}%"
        print(f"{fmt:<20}{nbytes / 1e9:>10.2f}{row['batch1']:>15.1f}{_ratio(row['batch1'], ref, 'batch1'):>8}"
              f"{row['batch']:>18.1f}{_ratio(row['batch'], ref, 'batch'):>8}"
              f"{'n/a' if limit is None else f'{limit:.0f}':>13}{share:>9}")
    if ref is not None:
        for fmt, row in rows.items():
            if fmt != "bf16":
                print(f"{fmt} weights are {100 * row['weight_bytes'] / ref['weight_bytes']:.1f}% of bf16's")


def _ratio(value: float, ref: dict | None, key: str) -> str:
    return f"{value / ref[key]:.2f}" if ref is not None else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(CONFIGS, "qwen3-8b.json"), help="a published config.json")
    ap.add_argument("--formats", default="bf16,Q8_0,Q4_K_M",
                    help="comma-separated rows, from bf16, Q8_0, Q4_K_M; FORMAT:dequantize loads a GGUF with "
                         "weight_format='dequantize'")
    ap.add_argument("--prompt", type=int, help="batch-1 prompt length in tokens (default 256)")
    ap.add_argument("--tokens", type=int, help="generated tokens per request (default 128)")
    ap.add_argument("--batch", type=int, help="requests in the throughput run, and max_num_seqs (default 128)")
    ap.add_argument("--batch-prompt", type=int, help="prompt length of each throughput request (default 128)")
    ap.add_argument("--repeats", type=int, help="timed runs after the warm-up; the best is reported (default 3)")
    ap.add_argument("--workdir", default=None, help="where the model files go (default: the system's temp dir)")
    ap.add_argument("--keep-models", default=None, metavar="DIR",
                    help="write the model files in DIR/<shape> and keep them; reuse those already there")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the config's architecture at a tiny shape (CPU smoke run)")
    ap.add_argument("--layers", type=int, help="keep only this many decoder layers of the config (a quicker run)")
    ap.add_argument("--kernel-profile", action="store_true",
                    help="also list the kernels of a batch-1 generation by GPU time (torch.profiler)")
    args = ap.parse_args()
    for fmt in args.formats.split(","):
        if fmt not in FORMATS and not (fmt.endswith(":dequantize") and fmt.split(":")[0] in FORMATS[1:]):
            ap.error(f"--formats: {fmt!r} is none of {', '.join(FORMATS)}, Q8_0:dequantize, Q4_K_M:dequantize")
    for key, value in (TINY_RUN if args.tiny else DEFAULT_RUN).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    with open(args.config, encoding="utf-8") as f:
        shape = json.load(f)
    if args.tiny:
        shape = {**shape, **TINY}
    if args.layers is not None:
        if args.layers < 1:
            ap.error(f"--layers must be at least 1, got {args.layers}")
        shape = {**shape, "num_hidden_layers": args.layers}
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu (with --tiny)")

    import transformers

    try:
        fi_version = __import__("flashinfer").__version__
    except ImportError:
        fi_version = "absent"
    model_name = os.path.basename(args.config).removesuffix(".json") + (" (tiny)" if args.tiny else "") + (
        f" cut to {args.layers} layers" if args.layers is not None else "")
    print(f"device: {device_name(args.device)}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"flashinfer {fi_version}")
    print(f"model: {model_name} shape, random weights; formats {args.formats}; batch 1: {args.prompt}-token prompt, "
          f"{args.tokens} new tokens; batch {args.batch}: {args.batch_prompt}-token prompts, {args.tokens} new tokens "
          f"each; greedy, ignore_eos, best of {args.repeats} after a warm-up", flush=True)
    rows, bandwidth = run(args, shape, os.environ.get("BRAID_TEST_TOKENIZER"))
    if bandwidth is not None:
        print(f"device copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print_table(rows, bandwidth, args)


if __name__ == "__main__":
    main()
