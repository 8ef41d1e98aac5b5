"""The public entry point: `LLM(model=...)` with generate / stream / chat, from threads or asyncio alike."""
from __future__ import annotations

import asyncio
import functools
import math
import os
import queue
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from collections.abc import Sequence as Seq
from typing import Any, Self

from braidinfer.channels import SyncChannel
from braidinfer.chat_template import encode_conversation
from braidinfer.chunks import Chunk, ChunkStore
from braidinfer.client import AsyncRequest, EngineClient, Stream, acollect, collect
from braidinfer.config import EngineConfig
from braidinfer.engine import LLMEngine, pick_device
from braidinfer.engine_loop import EngineLoop
from braidinfer.errors import InvalidRequestError, RequestTimeoutError
from braidinfer.guided import GuidedDecoding
from braidinfer.outputs import CompletionDelta, RequestOutput
from braidinfer.sampling_params import SamplingParams
from braidinfer.step_threads import without_workers
from braidinfer.tokenized_prompt import TokenizedPrompt

Prompt = str | list[int] | TokenizedPrompt
Chunks = Chunk | Seq[Chunk] | None


class LLM:
    """A loaded model behind a single engine thread; every method may be called from any thread or task.

    >>> llm = LLM()                                   # the embedded SmolLM2-135M-Instruct
    >>> llm.chat([{"role": "user", "content": "Hi"}]).text
    """

    def __init__(self, model: str | os.PathLike | None = None, **kwargs: Any):
        """`model`: a local model directory, a `.gguf` file (str or path), a hub id (downloaded into the Hugging Face
        cache on first use), or None for the embedded default model. Other keyword arguments are `EngineConfig`
        fields (dtype, device, max_num_seqs, max_num_batched_tokens, enable_prefix_caching, ...).

        Call `close()` (or use `with LLM(...) as llm:`) to free the engine at a known point; an LLM collected
        unclosed stops its engine thread and frees the engine then."""
        self.config = EngineConfig(model=model, **kwargs)
        with without_workers(pick_device(self.config.device)) as threads:
            self.engine = LLMEngine(self.config)
        self.tokenizer = self.engine.tokenizer
        self._loop = EngineLoop(self.engine, intra_op_threads=threads)
        self._client = EngineClient(self.engine, self._loop)
        # The template by the tokenizer, not this object's method: no reference cycle, so dropping the last
        # reference to an unclosed LLM shuts it down at once, in the dropping thread (not in a later collection).
        self.chunks = ChunkStore(self._client, functools.partial(encode_conversation, self.tokenizer))
        """Pinned prompt segments: `llm.chunks.add(text, after=..., kind=...)`, see `braidinfer.chunks`."""
        # Neither the chunks, the loop nor the engine refers back to this object, so it can be dropped while they run.
        self._shutdown = weakref.finalize(self, _shut_down, self.chunks, self._loop, self.engine)
        self._shutdown.atexit = False

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Releases every chunk, stops the engine thread (requests still running end with an error) and frees the
        engine's device memory."""
        self._shutdown()

    @property
    def alive(self) -> bool:
        """False once the LLM was closed or its engine loop died; every call then raises EngineDeadError."""
        return self._loop.alive

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- requests ----------------------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
                 *, chunks: Chunks = None, timeout: float | None = None) -> list[RequestOutput]:
        """Runs a batch to completion. `prompts`: a string, a list of token ids, a `TokenizedPrompt`, or a list of
        any of them.
        `params`: one SamplingParams for all prompts or one per prompt. `chunks`: a chain of chunks (or its last
        chunk) that every prompt continues; the prompt text then gets no leading special tokens and may be empty.
        `timeout`: seconds the whole batch may take; past them every request is aborted and RequestTimeoutError
        raised. Returns outputs in prompt order. The caller is woken once per request, when it ends."""
        deadline = _deadline(timeout)
        prefix, compose = self.chunks.resolve(chunks)
        prompt_list = _as_prompt_list(prompts)
        param_list = _as_param_list(params, len(prompt_list))
        channels = [SyncChannel(final_only=True) for _ in prompt_list]
        # Validate every request before submitting any, so a bad prompt costs no work.
        seqs = [self.engine.requests.sequence(p, sp, sink=c.put, prefix=prefix, compose=compose)
                for p, sp, c in zip(prompt_list, param_list, channels)]
        streams = [self._client.start(seq, c) for seq, c in zip(seqs, channels)]
        try:
            return [collect(s, deadline) for s in streams]
        except queue.Empty:
            raise RequestTimeoutError.after(timeout) from None
        finally:
            for s in streams:
                s.cancel()

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, *, chunks: Chunks = None
               ) -> Iterator[str]:
        """Yields text deltas as they become final. Leaving the loop early cancels the request."""
        for delta in self.stream_deltas(prompt, params, chunks=chunks):
            if delta.text:
                yield delta.text

    def stream_deltas(self, prompt: Prompt, params: SamplingParams | None = None, *, chunks: Chunks = None,
                      timeout: float | None = None) -> Iterator[CompletionDelta]:
        """Yields CompletionDeltas (text, token ids, logprobs of one step); the last one has finish_reason and
        usage. Leaving early cancels the request. `timeout`: seconds the whole request may take; past them it is
        aborted and RequestTimeoutError raised."""
        deadline = _deadline(timeout)
        stream = self._submit(prompt, params, SyncChannel(), chunks)
        try:
            while not stream.done:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    delta = stream.channel.get(wait)
                except queue.Empty:
                    raise RequestTimeoutError.after(timeout) from None
                yield stream.accept(delta)
        finally:
            stream.cancel()

    def astream(self, prompt: Prompt, params: SamplingParams | None = None, *, chunks: Chunks = None
                ) -> AsyncIterator[str]:
        """Async text deltas; no thread per request. The request is submitted when the iteration starts.

        Cancelling the consuming task, `aclose()`, or leaving `async for` early (`break`) ends the request within
        one engine step, as soon as the iterator is dropped. One still referenced after a `break` (kept in a
        variable) may be resumed, so it holds its request until it is closed (`contextlib.aclosing`,
        `await it.aclose()`) or collected."""
        return AsyncRequest(lambda: self._submit_async(prompt, params, chunks), texts=True)

    def astream_deltas(self, prompt: Prompt, params: SamplingParams | None = None, *, chunks: Chunks = None
                       ) -> AsyncIterator[CompletionDelta]:
        """Async CompletionDeltas; the last one has finish_reason and usage. Ends like `astream`."""
        return AsyncRequest(lambda: self._submit_async(prompt, params, chunks), texts=False)

    async def agenerate(self, prompt: Prompt, params: SamplingParams | None = None, *, chunks: Chunks = None
                        ) -> RequestOutput:
        """Async single-request generate. The waiting task is woken once, when the request ends, not per step."""
        stream = self._submit_async(prompt, params, chunks, final_only=True)
        try:
            return await acollect(stream)
        finally:
            stream.cancel()

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None, *, chunks: Chunks = None,
             **template_kwargs: Any) -> RequestOutput:
        """Applies the model's chat template (with add_generation_prompt) and generates the assistant's reply.
        `chunks` (e.g. from `llm.chunks.add_messages([system_message])`) must render as the start of the
        conversation. Extra keyword arguments go to the template (e.g. tools=..., enable_thinking=False)."""
        prefix, _ = self.chunks.resolve(chunks)
        ids = self.apply_chat_template(messages, **template_kwargs)
        if ids[: len(prefix)] != prefix:
            raise InvalidRequestError(
                "the conversation does not start with the given chunks: the chat template renders different tokens "
                f"within the first {len(prefix)} (build chunks with llm.chunks.add_messages from the same leading "
                "messages and template arguments)")
        return self.generate([ids[len(prefix):]], params, chunks=chunks)[0]

    def apply_chat_template(self, messages: list[dict[str, Any]], **template_kwargs: Any) -> list[int]:
        """Token ids of a conversation rendered by the model's chat template, ready for the assistant's turn.
        Special-token strings inside message contents (a user typing `<|im_end|>`) stay plain text."""
        return encode_conversation(self.tokenizer, messages, **template_kwargs)

    def compile_guided(self, guided: GuidedDecoding) -> None:
        """Compiles a grammar constraint for this model's tokenizer now (in the calling thread) and keeps it for the
        requests that use it; GrammarCompileError (an InvalidRequestError) when it cannot be compiled. For a caller
        that submits the constrained request only later (e.g. after a reasoning model's thought)."""
        if not isinstance(guided, GuidedDecoding):
            raise InvalidRequestError(f"guided must be a GuidedDecoding, got {type(guided).__name__}")
        self.engine.requests.grammars.matcher(guided)

    def num_cached_tokens(self, prompt: list[int]) -> int:
        """How many leading tokens of `prompt` (token ids, or a prompt as `generate` takes it) a request submitted
        now would read from the prefix cache (whole pages; the last token is always computed). Nothing is reserved:
        a later request may find more or fewer."""
        return self._loop.call(self._cached_prefix_length(prompt))

    async def anum_cached_tokens(self, prompt: list[int]) -> int:
        """`num_cached_tokens` for asyncio (waits for the engine thread without blocking the event loop)."""
        return await asyncio.wrap_future(self._loop.post(self._cached_prefix_length(prompt)))

    def cache_stats(self) -> dict[str, int | float]:
        """Pages free / cached / in use, hit rate and tokens served from the prefix cache."""
        return self._loop.call(self.engine.pages.stats)

    def memory_stats(self) -> dict[str, int]:
        """Memory the engine holds: weight_bytes (the weights as held, each storage once: quantised ones on CUDA as
        their GGUF blocks, on the CPU in the form `load_summary` names) and kv_bytes (the KV page pool). See
        `load_summary` for which weights stayed quantised."""
        return self._loop.call(self.engine.memory_stats)

    @property
    def load_summary(self) -> list[str]:
        """How the weights were loaded, one line each: their size, the tensors kept quantised per GGUF type, and the
        quantised tensors dequantised anyway, a line per reason with their count and first names
        (EngineConfig.weight_format)."""
        return list(self.engine.load_summary)

    # --- internals ---------------------------------------------------------------------------------------------
    def _cached_prefix_length(self, prompt: list[int]):
        """The engine-thread call behind num_cached_tokens (the last token is always computed); the prompt is
        checked here, in the caller's thread."""
        ids, pages = self.engine.requests.tokenize(prompt), self.engine.pages
        return lambda: pages.cached_prefix_length(ids, len(ids) - 1)

    def _submit(self, prompt: Prompt, params: SamplingParams | None, channel, chunks: Chunks = None) -> Stream:
        prefix, compose = self.chunks.resolve(chunks)
        seq = self.engine.requests.sequence(prompt, params, sink=channel.put, prefix=prefix, compose=compose)
        return self._client.start(seq, channel)

    def _submit_async(self, prompt: Prompt, params: SamplingParams | None, chunks: Chunks,
                      final_only: bool = False) -> Stream:
        """Submits a request whose deltas go to the running event loop (call it from a coroutine); `final_only`:
        all of them at once when it ends."""
        return self._submit(prompt, params, self._client.async_channel(final_only), chunks)


def _shut_down(chunks: ChunkStore, loop: EngineLoop, engine: LLMEngine) -> None:
    """Releases the chunks and refuses new ones, stops the engine thread, then frees the engine (LLM.close, or the
    LLM collected unclosed)."""
    chunks.close()
    loop.close()
    if loop.stopped:  # else a step still runs (it did not stop within the loop's join timeout)
        engine.close()


def _deadline(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or timeout < 0:
        raise InvalidRequestError(f"timeout must be None or a finite number of seconds >= 0, got {timeout!r}")
    return time.monotonic() + timeout


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, (str, TokenizedPrompt)) or (
            isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise InvalidRequestError(f"prompts must be a string, a list of token ids, a TokenizedPrompt or a list of "
                                  f"them, got {type(prompts).__name__}")
    if not prompts:
        raise InvalidRequestError("no prompts given")
    return list(prompts)


def _as_param_list(params, n: int) -> list[SamplingParams | None]:
    if params is None or isinstance(params, SamplingParams):
        return [params] * n
    if not isinstance(params, (list, tuple)):
        hint = "; build one with SamplingParams(**...)" if isinstance(params, dict) else ""
        raise InvalidRequestError(f"params must be SamplingParams or a list of them, got {type(params).__name__}{hint}")
    params = list(params)
    if len(params) != n:
        raise InvalidRequestError(f"got {len(params)} SamplingParams for {n} prompts")
    return params
