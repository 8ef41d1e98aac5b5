"""Prefix reuse: how much prefill chunks and the prefix cache save, each measured against the same work without reuse.

    python benchmarks/prefix_reuse.py multi-turn      # 10-turn chat on the embedded model: prefill tokens per turn
    python benchmarks/prefix_reuse.py rag             # 8 stdlib docs x 16 questions: exact chunks, and composed
                                                      # (independent) documents in shuffled orders vs exact
    python benchmarks/prefix_reuse.py all             # multi-turn and rag
    BRAID_TEST_TOKENIZER=/path/to/tokenizer python benchmarks/prefix_reuse.py ttft [--length 8192]
                                                      # CUDA: time to first token on a pinned 8k-token system chunk
                                                      # vs the same request cold (Qwen3-0.6B shape, random bf16)
    BRAID_TEST_TOKENIZER=/path/to/tokenizer python benchmarks/prefix_reuse.py cascade [--length 8192] [--batch 64]
                                                      # CUDA: decode step time of 64 requests on one pinned 8k-token
                                                      # chunk, cascade decode on vs off (same model)

`multi-turn` and `rag` run on the CPU with the embedded SmolLM2-135M-Instruct (greedy). "Prefill tokens" are the
prompt tokens a request computed (prompt minus those served from the KV cache). The reference for every figure is
the same requests on an engine with the prefix cache off, in the same run. Documents are the docstrings of Python
standard-library modules (real text that ships with Python), cut to about 300 tokens each.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import random
import time

import torch

from braidinfer import LLM, SamplingParams

SYSTEM = "You are a helpful assistant. Answer in one or two short sentences."
TURNS = [
    "Hi! Can you tell me what a river is?", "Which is the longest river in the world?",
    "How long is it, roughly?", "Which countries does it flow through?", "What animals live near it?",
    "Tell me one fact about its history.", "Is it used for transport?", "What is a delta?",
    "Name another long river.", "Thanks! Summarise our chat in one sentence.",
]
DOC_MODULES = ["argparse", "json", "csv", "re", "statistics", "heapq", "itertools", "sched"]
DOC_CHARS = 1200


def _engine(model: str | None, caching: bool, page_size: int) -> LLM:
    return LLM(model=model, device="cpu", page_size=page_size, progress=False, enable_prefix_caching=caching)


# --- multi-turn --------------------------------------------------------------------------------------------------
def multi_turn(model: str | None, page_size: int, max_tokens: int) -> None:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    rows = {}
    for caching in (True, False):
        with _engine(model, caching, page_size) as llm:
            messages = [{"role": "system", "content": SYSTEM}]
            turns, t0 = [], time.perf_counter()
            for text in TURNS:
                messages.append({"role": "user", "content": text})
                out = llm.chat(messages, params)
                messages.append({"role": "assistant", "content": out.text})
                turns.append((out.usage.prompt_tokens, out.usage.cached_prompt_tokens))
            rows[caching] = (turns, time.perf_counter() - t0)
    print(f"\nmulti-turn: 10 turns, embedded model, greedy, max_tokens={max_tokens}, page_size={page_size}")
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'prefilled':>9} {'prefilled w/o reuse':>20}")
    for i, ((p, c), (p0, c0)) in enumerate(zip(rows[True][0], rows[False][0]), 1):
        print(f"{i:>4} {p:>7} {c:>7} {p - c:>9} {p0 - c0:>20}")
    total = sum(p - c for p, c in rows[True][0])
    total_off = sum(p - c for p, c in rows[False][0])
    print(f"total prefill tokens: {total} with reuse vs {total_off} without ({total_off / total:.1f}x fewer); "
          f"wall time {rows[True][1]:.1f} s vs {rows[False][1]:.1f} s")


# --- RAG ---------------------------------------------------------------------------------------------------------
def documents() -> list[str]:
    docs = []
    for name in DOC_MODULES:
        text = inspect.getdoc(importlib.import_module(name)) or ""
        docs.append(f"Documentation of the Python module {name}:\n{text[:DOC_CHARS]}")
    return docs


def questions() -> list[str]:
    out = []
    for name in DOC_MODULES:
        out += [f"What is the Python module {name} for?", f"Name one function or class of the module {name}."]
    return out


def rag(model: str | None, page_size: int, max_tokens: int) -> None:
    docs, qs = documents(), questions()
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    with _engine(model, True, page_size) as on, _engine(model, False, page_size) as off:
        system_ids = on.apply_chat_template([{"role": "system", "content": SYSTEM}], add_generation_prompt=False)
        doc_ids = [on.engine.requests.tokenize("\n" + d + "\n", add_special_tokens=False) for d in docs]
        q_ids = [on.engine.requests.tokenize(f"Question: {q}\nAnswer:", add_special_tokens=False) for q in qs]
        print(f"\nrag: {len(docs)} documents ({sum(map(len, doc_ids))} tokens, stdlib docstrings) x {len(qs)} "
              f"questions, embedded model, greedy, max_tokens={max_tokens}, page_size={page_size}")

        # (a) exact chunks, same order: one chain system -> doc1 -> ... -> doc8, every question after it.
        t0 = time.perf_counter()
        chain = on.chunks.add(system_ids, kind="system")
        for d in doc_ids:
            chain = on.chunks.add(d, after=chain, kind="document")
        t_chunks = time.perf_counter() - t0
        t0 = time.perf_counter()
        exact = [on.generate(q, params, chunks=chain)[0] for q in q_ids]
        t_on = time.perf_counter() - t0
        t0 = time.perf_counter()
        plain = [off.generate(chain.prefix_token_ids + q, params)[0] for q in q_ids]
        t_off = time.perf_counter() - t0
        pre_on = sum(o.usage.prompt_tokens - o.usage.cached_prompt_tokens for o in exact)
        pre_off = sum(o.usage.prompt_tokens for o in plain)
        same = sum(a.token_ids == b.token_ids for a, b in zip(exact, plain))
        print("(a) exact chunks, same document order")
        print(f"    prefill tokens: {pre_on} with chunks (+{chain.num_prefix_tokens} once to add them) vs {pre_off} "
              f"without reuse; time for {len(qs)} questions: {t_on:.1f} s (+{t_chunks:.1f} s to add) vs "
              f"{t_off:.1f} s; identical greedy outputs: {same}/{len(qs)}")
        on.chunks.release_all()
        composed(on, off, system_ids, doc_ids, q_ids, params)


def composed(on: LLM, off: LLM, system_ids, doc_ids, q_ids, params: SamplingParams) -> None:
    """(b) documents added independently (each at position 0) and composed in a shuffled order per question."""
    rng = random.Random(0)
    t0 = time.perf_counter()
    system = on.chunks.add(system_ids, kind="system", independent=True)
    docs = [on.chunks.add(d, kind="document", independent=True) for d in doc_ids]
    t_add = time.perf_counter() - t0
    orders = [rng.sample(range(len(docs)), len(docs)) for _ in q_ids]
    t_comp = t_exact = 0.0
    agree_first = agree_all = prefilled = 0
    kls = []
    for q, order in zip(q_ids, orders):
        chunks = [system] + [docs[i] for i in order]
        full = [t for c in chunks for t in c.token_ids] + q
        t0 = time.perf_counter()
        got = on.generate(q, params, chunks=chunks)[0]
        t_comp += time.perf_counter() - t0
        prefilled += got.usage.prompt_tokens - got.usage.cached_prompt_tokens
        t0 = time.perf_counter()
        want = off.generate(full, params)[0]
        t_exact += time.perf_counter() - t0
        agree_first += got.token_ids[:1] == want.token_ids[:1]
        agree_all += got.token_ids == want.token_ids
        kls.append(_kl(_first_logprobs(off, full), _first_logprobs(on, q, chunks=chunks)))
    n = len(q_ids)
    print("(b) composed independent documents, shuffled order per question (approximate)")
    print(f"    prefill tokens: {prefilled}; time for {n} questions: {t_comp:.1f} s (+{t_add:.1f} s to add the "
          f"documents once) vs {t_exact:.1f} s exact recomputation")
    print(f"    quality vs exact: first greedy token equal {agree_first}/{n}, whole {params.max_tokens}-token greedy "
          f"reply equal {agree_all}/{n}, mean KL(exact || composed) of the first next-token distribution "
          f"{sum(kls) / n:.4f} nats")
    on.chunks.release_all()


def _first_logprobs(llm: LLM, prompt, **kwargs) -> torch.Tensor:
    """The full next-token log-distribution after `prompt` (the sampler's input, recorded for one greedy step)."""
    inner, rows = llm.engine.sampler, []

    def record(logits, params, generators):
        rows.append(logits.float().log_softmax(-1)[0].cpu())
        return inner(logits, params, generators)

    llm.engine.sampler = record
    try:
        llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1), **kwargs)
    finally:
        llm.engine.sampler = inner
    return rows[0]


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(p || q) of two log-distributions, in nats."""
    return float((p.exp() * (p - q)).sum())


# --- On CUDA: TTFT on a pinned chunk, cascade decode -----------------------------------------------------------
def _cuda_model(path: str) -> int:
    """Saves the latency benchmark's random Qwen3-0.6B-shaped model (bf16) to `path` (benchmarks/ is on sys.path
    when this file runs as a script); returns its weights' size in bytes (the tied LM head counted once)."""
    import os

    from latency import build_model

    tokenizer_dir = os.environ.get("BRAID_TEST_TOKENIZER")
    if not tokenizer_dir or not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device and BRAID_TEST_TOKENIZER (a saved tokenizer directory)")
    model = build_model(path, tokenizer_dir)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return weight_bytes


def ttft(length: int, question: int, repeats: int) -> None:
    """Cold: a fresh random prompt of `length + question` tokens. Cached: a pinned `length`-token system chunk plus
    a fresh `question`-token suffix. Both Braid, same engine, same run; best of `repeats`."""
    import tempfile

    from latency import random_prompt

    def first_token_s(llm: LLM, prompt, **kwargs) -> float:
        t0 = time.perf_counter()
        for chunk in llm.stream_deltas(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
                                       **kwargs):
            if chunk.token_ids:
                return time.perf_counter() - t0
        raise RuntimeError("no token")

    with tempfile.TemporaryDirectory() as path:
        _cuda_model(path)
        with LLM(model=path, device="cuda", dtype="bfloat16", progress=False) as llm:
            first_token_s(llm, random_prompt(length + question, seed=1))  # warm-up (kernels, JIT)
            cold = min(first_token_s(llm, random_prompt(length + question, seed=10 + r)) for r in range(repeats))
            t0 = time.perf_counter()
            system = llm.chunks.add(random_prompt(length, seed=2), kind="system")
            t_add = time.perf_counter() - t0
            cached = min(first_token_s(llm, random_prompt(question, seed=20 + r), chunks=system)
                         for r in range(repeats))
            system.release()
    print(f"device: {torch.cuda.get_device_name()}; Qwen3-0.6B shape, random bf16 weights, best of {repeats}")
    print(f"TTFT, {length}-token prefix + {question}-token question: cold {cold * 1e3:.1f} ms, on a pinned chunk "
          f"{cached * 1e3:.1f} ms ({cached / cold:.1%} of cold; adding the chunk once took {t_add * 1e3:.1f} ms)")


def cascade(length: int, batch: int, steps: int) -> None:
    """`batch` requests, each a pinned `length`-token chunk plus its own 16-token question, decode together; the
    decode step time is measured over `steps` steps once every request is past its prefill, with cascade decode on
    (any sharing) and off, on engines driven step by step in this thread. Reference: the byte floor of one step, the
    time to read the weights once, the shared chunk's KV once and each request's own KV (question and output so far)
    once, at the measured copy bandwidth; no decode step can be faster."""
    import tempfile

    from braidinfer.config import EngineConfig
    from braidinfer.engine import LLMEngine
    from latency import QWEN3_0_6B, copy_bandwidth, random_prompt

    def step_ms(path: str, **options) -> tuple[float, int]:
        engine = LLMEngine(EngineConfig(model=path, device="cuda", dtype="bfloat16", max_num_seqs=batch,
                                        progress=False, **options))
        prefix = random_prompt(length, seed=2)
        chunk = engine.requests.prefill(prefix, pin_owner="shared-prefix")
        engine.add(chunk)
        while engine.has_work():
            engine.step()
        params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
        seqs = [engine.requests.sequence(prefix + random_prompt(16, seed=100 + i), params) for i in range(batch)]
        for seq in seqs:
            engine.add(seq)
        while any(seq.num_output_tokens == 0 for seq in seqs):
            engine.step()
        graphs = engine.runner.graphs
        cascades = graphs.num_cascade_replays
        engine.step()  # warm-up (a re-plan)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        return elapsed / steps * 1e3, graphs.num_cascade_replays - cascades

    with tempfile.TemporaryDirectory() as path:
        weight_bytes = _cuda_model(path)
        on, on_replays = step_ms(path, cascade_decode=True, cascade_min_saved_tokens=0)
        torch.cuda.empty_cache()
        off, off_replays = step_ms(path, cascade_decode=False)
    c = QWEN3_0_6B
    kv_bytes_per_token = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * 2
    # Each request's own KV during the timed steps: its 16-token question, the 2 tokens generated before them (the
    # first token and the warm-up step's) and on average half of the timed steps' tokens.
    own_tokens = 16 + 2 + steps / 2
    shared_bytes, own_bytes = length * kv_bytes_per_token, batch * own_tokens * kv_bytes_per_token
    bandwidth = copy_bandwidth()
    floor_ms = (weight_bytes + shared_bytes + own_bytes) / bandwidth * 1e3
    print(f"device: {torch.cuda.get_device_name()}; Qwen3-0.6B shape, random bf16 weights, CUDA graphs + fused kernels")
    print(f"decode step, {batch} requests on one pinned {length}-token chunk (+16-token questions), greedy:")
    print(f"  cascade on:  {on:.2f} ms/step ({on_replays} cascade replays of the measured steps + warm-up)")
    print(f"  cascade off: {off:.2f} ms/step ({off_replays} cascade replays)")
    print(f"  speed-up {off / on:.2f}x")
    print(f"  byte floor {floor_ms:.2f} ms/step at copy bandwidth {bandwidth / 1e12:.2f} TB/s: weights "
          f"{weight_bytes / 1e9:.3f} GB + shared KV once {shared_bytes / 1e6:.1f} MB + each row's own KV "
          f"{own_bytes / 1e6:.1f} MB; cascade on takes {on / floor_ms:.2f}x the floor, off {off / floor_ms:.2f}x")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=["multi-turn", "rag", "all", "ttft", "cascade"])
    ap.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--length", type=int, default=8192, help="ttft: tokens in the pinned prefix")
    ap.add_argument("--repeats", type=int, default=3, help="ttft: best of this many requests")
    ap.add_argument("--batch", type=int, default=64, help="cascade: requests decoding together")
    ap.add_argument("--steps", type=int, default=32, help="cascade: decode steps timed")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.part in ("multi-turn", "all"):
        multi_turn(args.model, args.page_size, args.max_tokens)
    if args.part in ("rag", "all"):
        rag(args.model, args.page_size, args.max_tokens)
    if args.part == "ttft":
        ttft(args.length, 64, args.repeats)
    if args.part == "cascade":
        cascade(args.length, args.batch, args.steps)


if __name__ == "__main__":
    main()
