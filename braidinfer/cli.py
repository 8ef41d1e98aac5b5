"""`braid`: generate text or chat in the terminal with any model the engine can load."""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from braidinfer.chat_template import fold_system, has_system_role
from braidinfer.errors import BraidError, InvalidRequestError
from braidinfer.sampling_params import SamplingParams

DESCRIPTION = """Braid: a local LLM engine with exact KV reuse.

  braid generate "Why is the sky blue?"     stream one answer (chat template applied; --raw to skip it)
  braid chat                                 interactive multi-turn chat; earlier turns are served from the KV cache

Without --model the embedded SmolLM2-135M-Instruct (CPU-friendly; its 98 MB file is fetched once on first use) is
used. --model takes a local Hugging Face model directory, a .gguf file, or a hub id ("org/name", "org/name:Q4_K_M"),
downloaded on first use unless HF_HUB_OFFLINE=1."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="braid", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=None, help="model directory, .gguf file or hub id (default: embedded)")
    common.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    common.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    common.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate per answer")
    common.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    common.add_argument("--top-p", type=float, default=1.0)
    common.add_argument("--top-k", type=int, default=0)
    common.add_argument("--seed", type=int, default=None)
    common.add_argument("--stats", action="store_true", help="print token counts (incl. cached) after each answer")
    common.add_argument("--traceback", action="store_true", help="on an unexpected error, print its Python traceback")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", parents=[common], help="stream an answer to one prompt")
    g.add_argument("prompt", help="the prompt text")
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    c = sub.add_parser("chat", parents=[common], help="interactive multi-turn chat (empty line or Ctrl-D ends)")
    c.add_argument("--system", default=None, help="system prompt")
    return p


def main(argv: list[str] | None = None) -> int:
    """The `braid` command (`python -m braidinfer` too): parses `argv` (sys.argv's by default), runs the subcommand,
    returns the exit status: 2 for a mistake in the arguments, the model or a piped chat turn, 1 for an unexpected
    error (one line on stderr each; --traceback for the whole trace), 130 for Ctrl-C, 141 when the reader of the
    output went away."""
    args = _parser().parse_args(argv)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed)
        from braidinfer.llm import LLM  # imported late so --help stays fast

        with LLM(model=args.model, device=args.device, dtype=args.dtype) as llm:
            if args.command == "generate" and args.raw:
                _answer(llm, args.prompt, params, args.stats)
            elif args.command == "generate":
                _require_chat_template(llm, "; use --raw to send the prompt as is")
                _answer(llm, llm.apply_chat_template([{"role": "user", "content": args.prompt}]), params, args.stats)
            elif not _chat(llm, params, args.system, args.stats):
                return 2  # a turn failed in a chat read from a pipe: the script that fed it should know
    except BraidError as e:
        print(f"braid: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `braid generate ... | head`: the rest of the output has no reader
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        return 141
    except Exception as e:
        if args.traceback:
            traceback.print_exc()
        print(f"braid: error: {type(e).__name__}: {e}" + ("" if args.traceback else " (--traceback for details)"),
              file=sys.stderr)
        return 1
    return 0


def _answer(llm, prompt, params: SamplingParams, stats: bool) -> str:
    parts, last = [], None
    for delta in llm.stream_deltas(prompt, params):
        parts.append(delta.text)
        print(delta.text, end="", flush=True)
        last = delta
    print(flush=True)
    if stats and last is not None and last.usage is not None:
        u = last.usage
        print(f"[prompt {u.prompt_tokens} tokens ({u.cached_prompt_tokens} cached), completion {u.completion_tokens}, "
              f"finish: {last.finish_reason}]", file=sys.stderr, flush=True)
    return "".join(parts)


def _require_chat_template(llm, hint: str) -> None:
    if getattr(llm.tokenizer, "chat_template", None) is None:
        raise InvalidRequestError(f"the model's tokenizer has no chat template{hint}")


def _chat(llm, params: SamplingParams, system: str | None, stats: bool) -> bool:
    """Runs the chat; False when input came from a pipe and a turn failed (it was reported and skipped). For a
    template without a system role, the system prompt goes before the first user message's text."""
    _require_chat_template(llm, "; braid chat needs one (braid generate --raw sends a prompt as is)")
    as_given = has_system_role(llm.tokenizer)
    messages = [{"role": "system", "content": system}] if system else []
    interactive, failed = sys.stdin.isatty(), False
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        try:
            prompt = llm.apply_chat_template(messages if as_given else fold_system(messages))
            if interactive:
                print("braid> ", end="", flush=True)
            reply = _answer(llm, prompt, params, stats)
        except InvalidRequestError as e:  # this turn only (e.g. past the context): the conversation goes on
            messages.pop()
            print(("\n" if interactive else "") + f"braid: error: {e}", file=sys.stderr)  # off the braid> line
            failed = True
            continue
        messages.append({"role": "assistant", "content": reply})
    return interactive or not failed


if __name__ == "__main__":
    sys.exit(main())
