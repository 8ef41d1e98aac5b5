"""Batch-1 decode speed of the embedded SmolLM2-135M on the CPU: Braid vs transformers `generate`, same run.

    python benchmarks/cpu_decode.py [--tokens 128] [--repeats 3]

Decode tok/s excludes the prefill: for Braid, the time from the first streamed token to the last; for transformers,
the time of generate(N tokens) minus generate(1 token) on the same prompt.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch


def braid_decode_tps(llm, prompt: list[int], n: int) -> float:
    from braidinfer import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    stamps = [time.perf_counter() for chunk in llm.stream_deltas(prompt, params) if chunk.token_ids]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def hf_decode_tps(model, prompt: list[int], n: int) -> float:
    ids = torch.tensor([prompt])
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def timed(k):
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=k, min_new_tokens=k, **kw)
        return time.perf_counter() - t

    return (n - 1) / (timed(n) - timed(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from braidinfer import LLM
    from braidinfer.loader.embedded import default_model_path

    gguf = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf)).eval()
    with LLM(device="cpu", progress=False) as llm:
        prompt = llm.apply_chat_template([{"role": "user", "content": "Tell me a long story about a lighthouse."}])
        braid_decode_tps(llm, prompt, 8)  # warm-up
        hf_decode_tps(hf, prompt, 8)
        braid = max(braid_decode_tps(llm, prompt, args.tokens) for _ in range(args.repeats))
        ref = max(hf_decode_tps(hf, prompt, args.tokens) for _ in range(args.repeats))
    print(f"device: CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, fp32, prompt {len(prompt)} tokens, {args.tokens} new tokens, best of {args.repeats}")
    print(f"{'engine':<14}{'decode tok/s':>14}")
    print(f"{'braid':<14}{braid:>14.1f}")
    print(f"{'transformers':<14}{ref:>14.1f}")
    print(f"ratio braid/transformers: {braid / ref:.2f}")


if __name__ == "__main__":
    main()
