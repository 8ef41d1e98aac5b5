"""ChatBraid's host overhead under load: concurrent `ainvoke` calls vs `LLM.generate` on the same prompts, one run.

    python benchmarks/langchain_overhead.py                       # CPU, embedded SmolLM2-135M-Instruct, small sizes
    python benchmarks/langchain_overhead.py --profile             # and the top host functions of the ChatBraid run
    python benchmarks/langchain_overhead.py --profile-engine      # the engine thread's, both sides and their difference
    python benchmarks/langchain_overhead.py --random-smollm2 --tokenizer DIR --concurrency 128 --doc-tokens 1500
                                                                  # CUDA: SmolLM2-135M-shaped random bf16 weights
    python benchmarks/langchain_overhead.py --tiny-random --device cpu --concurrency 64 --doc-tokens 1500
                                                                  # CPU, tiny random model: the host work shows
    python benchmarks/langchain_overhead.py --model PATH          # any local model directory or .gguf

Every call shares one system prompt and one document (RAG-style) and asks its own short question; answers are
greedy and short (`--max-tokens`). Both sides run on the same engine and the same prompt token ids (rendered once by
ChatBraid's request builder), after a warm-up that computes the shared prefix for both, so the difference is the
adapter's host work per call: request building, pinning, streaming deltas into LangChain chunks, callbacks. Output
tok/s counts the tokens each side generated (greedy, so both generate the same tokens). Host CPU time per call is
printed for both sides too (the whole process, the caller's thread, the engine thread), from the run with the least
process CPU time: on CPU, where the forward itself dominates the wall clock, it is what shows the adapter's cost.
The runs alternate (raw, ChatBraid, raw, ...), each after a garbage collection; `ratio` compares the best of each
side, and the ratio of each interleaved pair is printed too, with their median, since host-bound runs spread.
`--random-smollm2` needs a saved SmolLM2 tokenizer directory (`--tokenizer`, or BRAID_TEST_TOKENIZER): the
embedded GGUF is not required.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import shutil
import tempfile
import time

SYSTEM = "You are a helpful assistant. Answer from the document in one short sentence."
SENTENCE = ("The river delta spreads into many channels, and the farmers who live there plant rice in the wet season "
            "and beans in the dry season. ")


def random_smollm2(tokenizer_dir: str) -> str:
    """A directory holding SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 KV heads) with random bf16
    weights and the given tokenizer (its chat template included)."""
    import transformers

    return _random_llama(transformers.AutoTokenizer.from_pretrained(tokenizer_dir), "bfloat16", hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)


def tiny_random() -> str:
    """A 2-layer Llama (hidden 64) with random float32 weights and the embedded model's tokenizer: its forward costs
    little, so on a CPU the host work around it weighs about as much as beside a GPU's short step."""
    from braidinfer.loader import resolve_model

    return _random_llama(resolve_model(None).load_tokenizer(), "float32", hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


def _random_llama(tokenizer, dtype: str, **shape) -> str:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        torch_dtype=dtype, **shape)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(getattr(torch, dtype))
    path = tempfile.mkdtemp(prefix="llama-random-")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main() -> None:
    args = _parse()
    model = args.model
    if args.random_smollm2:
        tokenizer = args.tokenizer or os.environ.get("BRAID_TEST_TOKENIZER")
        if not tokenizer:
            raise SystemExit("--random-smollm2 needs --tokenizer DIR (or BRAID_TEST_TOKENIZER): a saved SmolLM2 "
                             "tokenizer directory")
        model = random_smollm2(tokenizer)
    elif args.tiny_random:
        model = tiny_random()
    try:
        run(args, model)
    finally:
        if args.random_smollm2 or args.tiny_random:
            shutil.rmtree(model, ignore_errors=True)


def run(args: argparse.Namespace, model: str | None) -> None:
    from langchain_core.documents import Document
    from langchain_core.messages import HumanMessage, SystemMessage

    from braid_langchain import ChatBraid, engines
    from braidinfer import SamplingParams

    settings = {"max_num_seqs": max(args.concurrency, 1), **({"freeze_gc": True} if args.freeze_gc else {})}
    chat = ChatBraid(model=model, device=args.device, temperature=0.0, max_tokens=args.max_tokens,
                     engine_kwargs=settings)
    llm = engines.get_engine(model, args.device, "auto", **settings)
    words = SENTENCE.split()
    doc_words = []
    while len(llm.tokenizer(" ".join(doc_words))["input_ids"]) < args.doc_tokens:
        doc_words += words
    document = Document(" ".join(doc_words), id="delta")
    conversations = [[SystemMessage(SYSTEM), HumanMessage(f"Question {i}: what do the farmers plant, and when?")]
                     for i in range(args.calls)]
    prompts = [chat._request(m, None, llm, {"documents": [document]}).prompt for m in conversations]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)

    engine_thread = llm._loop._thread

    def run_raw() -> tuple[float, int]:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        return time.perf_counter() - start, sum(len(o.token_ids) for o in outputs)

    async def run_chat() -> tuple[float, int]:
        limit = asyncio.Semaphore(args.concurrency)

        async def one(messages):
            async with limit:
                return await chat.ainvoke(messages, documents=[document])

        start = time.perf_counter()
        replies = await asyncio.gather(*(one(m) for m in conversations))
        return time.perf_counter() - start, sum(r.usage_metadata["output_tokens"] for r in replies)

    run_raw()  # warm-up: the shared prefix computed and cached, CUDA graphs captured
    asyncio.run(run_chat())
    raw, ours, raw_cpu, chat_cpu = [], [], [], []
    for _ in range(args.repeats):  # interleaved, best of N for both
        raw.append(_timed(run_raw, engine_thread, raw_cpu))
        ours.append(_timed(lambda: asyncio.run(run_chat()), engine_thread, chat_cpu))
    raw_s, raw_tokens = min(raw)
    chat_s, chat_tokens = min(ours)
    prompt_len = sum(map(len, prompts)) / len(prompts)
    print(f"model {model or 'embedded SmolLM2-135M-Instruct'} on {llm.engine.device}; {args.calls} calls, "
          f"{args.concurrency} concurrent, prompts of {prompt_len:.0f} tokens (document {args.doc_tokens}), "
          f"max {args.max_tokens} new tokens, best of {args.repeats}")
    print(f"LLM.generate          {raw_tokens / raw_s:10.1f} output tok/s  ({raw_tokens} tokens, {raw_s:.3f} s)")
    print(f"ChatBraid.ainvoke     {chat_tokens / chat_s:10.1f} output tok/s  ({chat_tokens} tokens, {chat_s:.3f} s)")
    print(f"ratio                 {(chat_tokens / chat_s) / (raw_tokens / raw_s):10.2f}x")
    pairs = sorted((c_tok / c_s) / (r_tok / r_s) for (r_s, r_tok), (c_s, c_tok) in zip(raw, ours))
    print(f"ratio of each pair    {', '.join(f'{r:.2f}' for r in pairs)} (median {pairs[len(pairs) // 2]:.2f}x)")
    print(f"host time per call    {(chat_s - raw_s) / args.calls * 1e3:10.2f} ms more than the raw engine")
    for name, cpu in (("LLM.generate", min(raw_cpu)), ("ChatBraid.ainvoke", min(chat_cpu))):
        process, caller, engine = (t / args.calls * 1e3 for t in cpu)
        print(f"CPU per call {name:18s} {process:7.2f} ms process, {caller:6.2f} ms caller thread, "
              f"{engine:6.2f} ms engine thread")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        asyncio.run(run_chat())
        profiler.disable()  # the caller's thread only: the engine thread's work is not in it
        pstats.Stats(profiler).sort_stats(args.profile_sort).print_stats(args.profile_lines)
    if args.profile_engine:
        raw_stats, raw_steps = _engine_profile(llm, run_raw)
        chat_stats, chat_steps = _engine_profile(llm, lambda: asyncio.run(run_chat()))
        for name, stats in (("LLM.generate", raw_stats), ("ChatBraid.ainvoke", chat_stats)):
            print(f"engine thread, {name}:")
            stats.sort_stats(args.profile_sort).print_stats(args.profile_lines)
        _print_engine_difference(raw_stats, chat_stats, args.calls, args.profile_lines)
        for name, (decode, mixed) in (("LLM.generate", raw_steps), ("ChatBraid.ainvoke", chat_steps)):
            print(f"engine steps {name:18s} {decode:5d} decode-only, {mixed:5d} with prefill")


def _engine_profile(llm, run) -> tuple[pstats.Stats, list[int]]:
    """cProfile of the engine thread during run() (Python 3.11's profiler hooks the thread that enables it), and
    the steps it took: [decode-only, with some prefill]. On a GPU only decode-only steps replay a CUDA graph; a
    step that admits a request runs eagerly, so requests arriving spread over many steps cost host time there."""
    profiler, steps, scheduler = cProfile.Profile(), [0, 0], llm.engine.scheduler
    schedule = scheduler.schedule

    def counted():
        batch = schedule()
        if batch:
            steps[any(n > 1 for n in batch.num_new_tokens)] += 1
        return batch

    llm._loop.call(profiler.enable)
    scheduler.schedule = counted
    try:
        run()
    finally:
        llm._loop.call(profiler.disable)
        del scheduler.schedule
    return pstats.Stats(profiler), steps


def _print_engine_difference(raw: pstats.Stats, chat: pstats.Stats, calls: int, lines: int) -> None:
    """The engine-thread functions whose own time per call grew most from LLM.generate to ChatBraid."""
    def own_times(stats):
        return {func: (tt, cc) for func, (cc, nc, tt, ct, callers) in stats.stats.items()}

    raw_times, chat_times = own_times(raw), own_times(chat)
    grown = sorted(((chat_times[f][0] - raw_times.get(f, (0.0, 0))[0], f) for f in chat_times), reverse=True)
    print(f"engine thread: own time per call, ChatBraid minus LLM.generate (top {lines})")
    for delta, (file, line, name) in grown[:lines]:
        calls_raw, calls_chat = raw_times.get((file, line, name), (0.0, 0))[1], chat_times[(file, line, name)][1]
        print(f"{delta / calls * 1e3:8.3f} ms  calls {calls_raw:6d} -> {calls_chat:6d}  "
              f"{os.path.basename(file)}:{line}({name})")


def _cpu_times(engine_thread) -> tuple[float, float, float]:
    """CPU seconds so far of the process, the calling thread and the engine thread."""
    engine = time.clock_gettime(time.pthread_getcpuclockid(engine_thread.ident))
    return time.process_time(), time.thread_time(), engine


def _timed(run, engine_thread, cpu: list) -> tuple[float, int]:
    """run()'s result; appends the CPU seconds it took (process, caller thread, engine thread) to `cpu`. Garbage is
    collected first, so that a full collection the earlier runs' garbage would set off (a few hundred milliseconds
    with torch loaded) does not land inside this one."""
    gc.collect()
    before = _cpu_times(engine_thread)
    result = run()
    cpu.append(tuple(b - a for a, b in zip(before, _cpu_times(engine_thread))))
    return result


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local model directory or .gguf (default: the embedded model)")
    p.add_argument("--random-smollm2", action="store_true", help="SmolLM2-135M-shaped random bf16 weights")
    p.add_argument("--tiny-random", action="store_true",
                   help="a 2-layer random Llama with the embedded tokenizer: host overhead on CPU")
    p.add_argument("--tokenizer", default=None, help="saved SmolLM2 tokenizer directory, for --random-smollm2")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent ainvoke calls (GPU target: 128)")
    p.add_argument("--calls", type=int, default=None, help="calls per run (default: 2 x concurrency)")
    p.add_argument("--doc-tokens", type=int, default=300, help="shared document length (GPU: 1500)")
    p.add_argument("--max-tokens", type=int, default=8, help="answer length limit")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--freeze-gc", action="store_true", help="engine option freeze_gc (see braidinfer/heap.py)")
    p.add_argument("--profile", action="store_true", help="cProfile one more ChatBraid run (caller thread)")
    p.add_argument("--profile-engine", action="store_true",
                   help="cProfile the engine thread over one more run of each side, and their difference")
    p.add_argument("--profile-lines", type=int, default=25)
    p.add_argument("--profile-sort", default="tottime", help="pstats sort key (tottime, cumulative, ...)")
    args = p.parse_args()
    args.calls = args.calls or 2 * args.concurrency
    return args


if __name__ == "__main__":
    main()
