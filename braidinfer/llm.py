"""The public entry point: `LLM(model=...)` with generate / stream / chat, from threads or asyncio alike."""
from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import AsyncIterator, Callable, Iterator
from collections.abc import Sequence as Seq
from typing import Any, Self

from braidinfer.chat_template import encode_conversation
from braidinfer.chunks import Chunk, ChunkStore
from braidinfer.config import EngineConfig
from braidinfer.engine import LLMEngine
from braidinfer.engine_loop import AsyncChannel, EngineLoop, SyncChannel
from braidinfer.errors import EngineDeadError, InvalidRequestError, RequestTimeoutError
from braidinfer.outputs import CompletionChunk, RequestOutput
from braidinfer.sampling_params import SamplingParams

Prompt = str | list[int]
Chunks = Chunk | Seq[Chunk] | None


class LLM:
    """A loaded model behind a single engine thread; every method may be called from any thread or task.

    >>> llm = LLM()                                   # the embedded SmolLM2-135M-Instruct
    >>> llm.chat([{"role": "user", "content": "Hi"}]).text
    """

    def __init__(self, model: str | None = None, **kwargs: Any):
        """`model`: a local model directory, a `.gguf` file, a hub id in the local Hugging Face cache, or None for
        the embedded default model. Other keyword arguments are `EngineConfig` fields (dtype, device,
        max_num_seqs, max_num_batched_tokens, enable_prefix_caching, ...)."""
        self.config = EngineConfig(model=model, **kwargs)
        self.engine = LLMEngine(self.config)
        self.tokenizer = self.engine.tokenizer
        self._loop = EngineLoop(self.engine)
        self.chunks = ChunkStore(self)
        """Pinned prompt segments: `llm.chunks.add(text, after=..., kind=...)`, see `braidinfer.chunks`."""

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Releases every chunk and stops the engine thread; requests still running end with an error."""
        self.chunks.release_all()
        self._loop.close()

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
                 *, chunks: Chunks = None) -> list[RequestOutput]:
        """Runs a batch to completion. `prompts`: a string, a list of token ids, or a list of either.
        `params`: one SamplingParams for all prompts or one per prompt. `chunks`: a chain of chunks (or its last
        chunk) that every prompt continues; the prompt text then gets no leading special tokens and may be empty.
        Returns outputs in prompt order."""
        prefix, compose = self.chunks.resolve(chunks)
        prompt_list = _as_prompt_list(prompts)
        param_list = _as_param_list(params, len(prompt_list))
        channels = [SyncChannel() for _ in prompt_list]
        # Validate every request before submitting any, so a bad prompt costs no work.
        seqs = [self.engine.make_sequence(p, sp, sink=c.put, prefix=prefix, compose=compose)
                for p, sp, c in zip(prompt_list, param_list, channels)]
        streams = [self._start(seq, c) for seq, c in zip(seqs, channels)]
        try:
            return [_collect(s) for s in streams]
        finally:
            for s in streams:
                s.cancel()

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, *, chunks: Chunks = None
               ) -> Iterator[str]:
        """Yields text deltas as they become final. Leaving the loop early cancels the request."""
        for chunk in self.stream_chunks(prompt, params, chunks=chunks):
            if chunk.text:
                yield chunk.text

    def stream_chunks(self, prompt: Prompt, params: SamplingParams | None = None, *, chunks: Chunks = None,
                      timeout: float | None = None) -> Iterator[CompletionChunk]:
        """Yields CompletionChunks; the last one has finish_reason and usage. Leaving early cancels the request.
        `timeout`: seconds the whole request may take; past them it is aborted and RequestTimeoutError raised."""
        deadline = None if timeout is None else time.monotonic() + timeout
        stream = self._submit(prompt, params, SyncChannel(), chunks)
        try:
            while not stream.done:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    chunk = stream.channel.get(wait)
                except queue.Empty:
                    raise RequestTimeoutError(f"the request ran past its {timeout:.3g} s deadline and was aborted"
                                              ) from None
                yield stream.accept(chunk)
        finally:
            stream.cancel()

    def astream(self, prompt: Prompt, params: SamplingParams | None = None, *, chunks: Chunks = None
                ) -> AsyncIterator[str]:
        """Async text deltas; no thread per request. The request is submitted when the iteration starts.

        Cancelling the consuming task, `aclose()`, or leaving `async for` early (`break`) ends the request within
        one engine step, as soon as the iterator is dropped. One still referenced after a `break` (kept in a
        variable) may be resumed, so it holds its request until it is closed (`contextlib.aclosing`,
        `await it.aclose()`) or collected."""
        return _AsyncRequest(lambda: self._submit_async(prompt, params, chunks), texts=True)

    def astream_chunks(self, prompt: Prompt, params: SamplingParams | None = None, *, chunks: Chunks = None
                       ) -> AsyncIterator[CompletionChunk]:
        """Async CompletionChunks; the last one has finish_reason and usage. Ends like `astream`."""
        return _AsyncRequest(lambda: self._submit_async(prompt, params, chunks), texts=False)

    async def agenerate(self, prompt: Prompt, params: SamplingParams | None = None, *, chunks: Chunks = None
                        ) -> RequestOutput:
        """Async single-request generate."""
        stream = self._submit_async(prompt, params, chunks)
        try:
            return await _acollect(stream)
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

    def num_cached_tokens(self, prompt: list[int]) -> int:
        """How many leading tokens of `prompt` (token ids) a request submitted now would read from the prefix cache
        (whole pages; the last token is always computed). Nothing is reserved: a later request may find more or
        fewer."""
        return self._loop.call(lambda: self.engine.pages.cached_prefix_length(prompt, len(prompt) - 1))

    async def anum_cached_tokens(self, prompt: list[int]) -> int:
        """`num_cached_tokens` for asyncio (waits for the engine thread without blocking the event loop)."""
        future = self._loop.post(lambda: self.engine.pages.cached_prefix_length(prompt, len(prompt) - 1))
        return await asyncio.wrap_future(future)

    def cache_stats(self) -> dict[str, int | float]:
        """Pages free / cached / in use, hit rate and tokens served from the prefix cache."""
        return self._loop.call(self.engine.pages.stats)

    # --- internals ---------------------------------------------------------------------------------------------
    def _submit(self, prompt: Prompt, params: SamplingParams | None, channel, chunks: Chunks = None) -> _Stream:
        prefix, compose = self.chunks.resolve(chunks)
        seq = self.engine.make_sequence(prompt, params, sink=channel.put, prefix=prefix, compose=compose)
        return self._start(seq, channel)

    def _submit_async(self, prompt: Prompt, params: SamplingParams | None, chunks: Chunks) -> _Stream:
        """Submits a request whose chunks go to the running event loop (call it from a coroutine)."""
        return self._submit(prompt, params, AsyncChannel(asyncio.get_running_loop()), chunks)

    def _prefill_and_pin(self, token_ids: list[int], private: bool = False) -> list[int]:
        """Runs a chunk's prefill and returns the pages it pinned (the chunk store takes ownership)."""
        channel = SyncChannel()
        seq = self.engine.make_prefill(token_ids, sink=channel.put, private=private)
        stream = self._start(seq, channel)
        try:
            _collect(stream)
        except BaseException:
            self._abandon_prefill(stream, seq)
            raise
        return seq.pinned_pages

    async def _aprefill_and_pin(self, token_ids: list[int], private: bool = False) -> list[int]:
        channel = AsyncChannel(asyncio.get_running_loop())
        seq = self.engine.make_prefill(token_ids, sink=channel.put, private=private)
        stream = self._start(seq, channel)
        try:
            await _acollect(stream)
        except BaseException:
            self._abandon_prefill(stream, seq)
            raise
        return seq.pinned_pages

    def _abandon_prefill(self, stream: _Stream, seq) -> None:
        # The caller gave up (error, cancellation): nothing may stay pinned without a handle. The abort and the
        # unpin run in the engine thread in this order, after any pin the prefill made.
        stream.cancel()
        try:
            self._loop.post(lambda: self.engine.drop_pins(seq))
        except EngineDeadError:
            pass

    def _unpin(self, pages: list[int]) -> None:
        if not pages:
            return
        try:
            self._loop.post(lambda: self.engine.pages.unpin(pages))
        except EngineDeadError:  # the engine is gone, and its page pool with it
            pass

    def _start(self, seq, channel) -> _Stream:
        stream = _Stream(self._loop, seq.request_id, seq.token_ids[:], channel)
        self._loop.submit(seq)
        return stream


class _Stream:
    def __init__(self, loop: EngineLoop, request_id: str, prompt_token_ids: list[int], channel):
        self.loop, self.request_id, self.channel = loop, request_id, channel
        self.prompt_token_ids = prompt_token_ids
        self.done = False

    def accept(self, chunk: CompletionChunk) -> CompletionChunk:
        """Takes the next chunk off the channel: raises if the request failed, marks the stream done at its end."""
        if chunk.error is not None:
            self.done = True
            raise chunk.error
        self.done = chunk.finish_reason is not None
        return chunk

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            self.loop.abort(self.request_id)


class _AsyncRequest:
    """What astream / astream_chunks return: an async iterator over one request, which `start` submits on the
    first step.

    Not an async generator: dropping one of those only schedules its aclose() on the event loop (asyncio's
    finalizer hook), so a consumer that breaks out of `async for` and then runs on without yielding to the loop
    would keep the request generating and its pages held. This one ends the request as it is dropped."""

    def __init__(self, start: Callable[[], _Stream], texts: bool):
        self._start, self._texts = start, texts  # texts: yield the non-empty text deltas instead of the chunks
        self._stream: _Stream | None = None
        self._closed = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> str | CompletionChunk:
        if self._closed:
            raise StopAsyncIteration
        if self._stream is None:
            self._stream = self._start()
        stream = self._stream
        try:
            while not stream.done:
                chunk = stream.accept(await stream.channel.get())
                if not self._texts:
                    return chunk
                if chunk.text:
                    return chunk.text
        except BaseException:  # the task was cancelled (a failed request has ended already)
            stream.cancel()
            raise
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Ends the request now (a no-op once it has ended); the iterator then stops."""
        self._close()

    def __del__(self) -> None:
        self._close()

    def _close(self) -> None:
        self._closed = True
        if self._stream is not None:
            self._stream.cancel()


class _Accumulator:
    def __init__(self):
        self.text, self.token_ids, self.logprobs, self.last = [], [], [], None

    def add(self, chunk: CompletionChunk) -> None:
        self.text.append(chunk.text)
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs)
        self.last = chunk

    def output(self, prompt_token_ids: list[int]) -> RequestOutput:
        last = self.last
        return RequestOutput(last.request_id, prompt_token_ids, "".join(self.text), self.token_ids,
                             last.finish_reason, last.usage, self.logprobs)


def _collect(stream: _Stream) -> RequestOutput:
    acc = _Accumulator()
    while not stream.done:
        acc.add(stream.accept(stream.channel.get()))
    return acc.output(stream.prompt_token_ids)


async def _acollect(stream: _Stream) -> RequestOutput:
    acc = _Accumulator()
    while not stream.done:
        acc.add(stream.accept(await stream.channel.get()))
    return acc.output(stream.prompt_token_ids)


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise InvalidRequestError("no prompts given")
    return prompts


def _as_param_list(params, n: int) -> list[SamplingParams | None]:
    if params is None or isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise InvalidRequestError(f"got {len(params)} SamplingParams for {n} prompts")
    return params
