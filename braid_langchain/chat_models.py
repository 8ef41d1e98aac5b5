"""ChatBraid: a LangChain chat model on the local Braid engine, reusing the KV of shared prompt prefixes."""
from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import aclosing, closing, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Dict, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.tools import BaseTool
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from typing_extensions import Self

from braidinfer.tokenized_prompt import TokenizedPrompt

from braid_langchain import direct_calls, engines, retries, thinking
from braid_langchain.chat_format import ChatFormat, chat_format, template_inputs
from braid_langchain.documents import render_sorted_documents, sort_documents
from braid_langchain.messages import to_chat_messages
from braid_langchain.pinning import pins_for, segment_heads
from braid_langchain.prompt_cache import split_prompt_ids
from braid_langchain.reasoning import ThoughtSplitter
from braid_langchain.strict_tools import Validators, argument_validators
from braid_langchain.streaming import ReplyBuilder, ToolMode, with_errors
from braid_langchain.structured import (
    StructuredOutputMethod,
    response_format_guided,
    schema_prompt,
    structured_output,
)
from braid_langchain.tool_formats import forced_call_tag, history_call_id, history_calls, rename_arguments
from braid_langchain.tools import (
    ToolChoice,
    any_of_schemas,
    forced_call_schema,
    normalize_tool_choice,
    to_openai_tools,
    tool_names,
    tool_prompt,
)

if TYPE_CHECKING:
    from braidinfer import LLM, SamplingParams
    from braidinfer.guided import GuidedDecoding

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
"""What `model=None` loads: the engine's embedded default model."""

_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "seed", "repetition_penalty",
                    "presence_penalty", "frequency_penalty")
_CALL_ARGS = frozenset({"tools", "tool_choice", "guided", "documents", "model", "response_format",
                        "parallel_tool_calls", "strict", "reasoning", "max_reasoning_tokens", *_SAMPLING_FIELDS})
_ReasoningBudget = Annotated[int | None, Field(ge=1)]  # max_reasoning_tokens, the field and the call argument
_REASONING_BUDGET = TypeAdapter(_ReasoningBudget)
_IGNORED_CALL_ARGS = frozenset({"stream", "ls_structured_output_format"})  # LangChain's own routing hints
_ENGINE_FIELDS = ("model", "device", "dtype")  # EngineConfig fields that have a ChatBraid field of their own


def _signed(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` with its signature computed once: LangChain inspects `_generate` / `_agenerate` on every call (whether
    they take a run_manager), and building the signature anew took ~50 us of each call's host time."""
    fn.__signature__ = inspect.signature(fn)
    return fn


class ChatBraid(BaseChatModel):
    """Chat with a local model through the Braid engine.

    System prompts, documents and earlier turns (answers included) that repeat across calls are served from the
    engine's KV cache; `usage_metadata["input_token_details"]["cache_read"]` says how many prompt tokens were.

    Call arguments (via `invoke(..., **kwargs)` or `.bind(...)`): `documents` (retrieved `Document`s, rendered
    after the system prompt in a stable order, see `braid_langchain.documents`), `guided` (a
    `braidinfer.guided.GuidedDecoding` constraint; a JSON schema is also shown to the model in the system
    prompt, since a model that has not seen the schema fills it poorly), `response_format` (OpenAI style:
    `{"type": "json_object"}`, `{"type": "json_schema", "json_schema": {"schema": ...}}`, or a pydantic class /
    JSON schema; the reply is constrained to it, or to a tool call when tools are offered), `parallel_tool_calls`
    (False: at most one tool call per reply), `strict` (True: tool calls' arguments are checked against their
    schemas, see `bind_tools`), `model` (another model for this call), `reasoning` and `max_reasoning_tokens`
    (below), and the sampling fields below.

    Reasoning models (Qwen3, DeepSeek-R1-distill: a template that knows `</think>`) reply with their thought in
    `additional_kwargs["reasoning_content"]` (LangChain's "reasoning" content blocks), never in `content`, and count
    its tokens in `usage_metadata["output_token_details"]["reasoning"]`; tool calls and constrained output apply to
    the answer after the thought. Tool calls are written and parsed in each family's own format
    (`braid_langchain.tool_formats`).

    Engines are shared per configuration (`model`, `device`, `dtype`, `engine_kwargs`) by every ChatBraid in the
    process; see `braid_langchain.engines`.

    Example: `ChatBraid(temperature=0).invoke("Name a colour.").content`
    """

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    """A local model directory, a `.gguf` file or a hub id in the local cache; None = embedded SmolLM2-135M-Instruct."""
    device: str | None = None
    """"cpu", "cuda" or "cuda:N"; None picks CUDA when available."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and activations dtype; auto = bfloat16 on CUDA, float32 on CPU (the KV pool's: `kv_cache_dtype` in
    engine_kwargs)."""
    temperature: float = 0.7
    """Sampling temperature; 0 is greedy."""
    max_tokens: int = 256
    """Most tokens generated per reply."""
    top_p: float = 1.0
    """Nucleus sampling: smallest token set with this much probability mass, in (0, 1]."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 or -1 = off."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one, in [0, 1]."""
    seed: int | None = None
    """Per-request seed for reproducible sampling; None = the engine's generator."""
    repetition_penalty: float = 1.0
    """Divides the logits of tokens already in the prompt or reply (> 0; 1 = off); breaks small models' loops."""
    presence_penalty: float = 0.0
    """Subtracted from the logits of tokens already generated, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted once per earlier occurrence in the reply, in [-2, 2]."""
    stop: list[str] | None = None
    """Strings that end the reply (not included in it); a call's `stop` replaces these."""
    reasoning: bool | None = None
    """Reasoning models: True/False switches thinking through the chat template (`enable_thinking`; a template
    that always thinks gets an empty, closed thought for False); None keeps the model's default."""
    max_reasoning_tokens: _ReasoningBudget = None
    """Reasoning models: the most tokens of thought; past it the thought is closed (`</think>`) and the model
    answers. None = no limit but max_tokens. Ignored for models that do not reason."""
    streaming: bool = False
    """Route `invoke` through streaming so callbacks see every token."""
    pin_prefixes: bool = True
    """Pin the system prompt and each document as engine chunks, so they stay computed under memory pressure
    (see `braid_langchain.pinning`); reuse is exact either way."""
    timeout: float | None = Field(None, gt=0)
    """Deadline of one call in seconds (pinning, queueing and generation, retries included; it starts once the
    engine is loaded); past it the request is aborted, its KV pages freed, and `braidinfer.errors.RequestTimeoutError`
    (a `TimeoutError`) raised. None = no deadline."""
    max_retries: int = Field(2, ge=0)
    """Retries of a call that failed for a transient reason: a CUDA out-of-memory error in its engine step, or an
    engine whose loop died (the retry runs on a freshly loaded engine). Invalid requests are never retried, nor a
    call whose output already reached a stream's consumer or a callback, nor one past its `timeout`."""
    engine_kwargs: Dict[str, Any] = Field(default_factory=dict)  # noqa: UP006 (`dict` here is BaseModel.dict)
    """Further `braidinfer.config.EngineConfig` fields for the engine (e.g. `max_num_seqs`, `max_model_len`,
    `gpu_memory_utilization`, `enforce_eager`, `enable_prefix_caching`); ChatBraids with equal settings share
    one engine."""

    @model_validator(mode="after")
    def _validate(self) -> Self:
        from braidinfer.config import EngineConfig

        shadowed = sorted(set(self.engine_kwargs) & {*_ENGINE_FIELDS, "progress"})
        if shadowed:
            raise ValueError(f"engine_kwargs may not set {shadowed}: use ChatBraid's own fields (model, device, dtype)")
        # device, dtype and every engine setting are checked here; no engine is loaded.
        EngineConfig(model=self.model, device=self.device, dtype=self.dtype, **self.engine_kwargs)
        self._sampling_params(None, None, {})  # the engine's own rules for every sampling field
        return self

    # --- serialization ------------------------------------------------------------------------------------------
    @classmethod
    def is_lc_serializable(cls) -> bool:
        """True: a ChatBraid's configuration is plain data. Restore one with `langchain_core.load.loads(text,
        valid_namespaces=["braid_langchain"], additional_import_mappings={path: path})` where `path` is
        `("braid_langchain", "chat_models", "ChatBraid")` (langchain-core loads only the classes it maps)."""
        return True

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        return ["braid_langchain", "chat_models"]

    # --- identity -----------------------------------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "braid-chat"

    @property
    def model_name(self) -> str:
        return _display_name(self.model)

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model_name, "device": self.device, "dtype": self.dtype,
                **{f: getattr(self, f) for f in _SAMPLING_FIELDS}, "stop": self.stop, **self.engine_kwargs}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="braid", ls_model_name=_display_name(kwargs.get("model", self.model)),
                                 ls_model_type="chat", ls_temperature=kwargs.get("temperature", self.temperature),
                                 ls_max_tokens=kwargs.get("max_tokens", self.max_tokens))
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    def _resolve_model_profile(self) -> ModelProfile | None:
        return ModelProfile(open_weights=True, text_inputs=True, image_inputs=False, audio_inputs=False,
                            video_inputs=False, pdf_inputs=False, text_outputs=True, tool_calling=True,
                            tool_choice=True, tool_call_streaming=True, structured_output=True, temperature=True)

    # --- generation ---------------------------------------------------------------------------------------------
    def invoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
               stop: list[str] | None = None, **kwargs: Any) -> AIMessage:
        """LangChain's `invoke`; a call that no callback, cache or rate limiter would see skips its run bookkeeping
        (`braid_langchain.direct_calls`) and returns the same message."""
        direct = direct_calls.direct_config(self, config, kwargs)
        if direct is None:
            return super().invoke(input, config, stop=stop, **kwargs)
        result = self._generate(direct_calls.messages_of(self, input), stop=stop, **direct_calls.model_kwargs(kwargs))
        return direct_calls.finish(result, direct)

    async def ainvoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
                      stop: list[str] | None = None, **kwargs: Any) -> AIMessage:
        """LangChain's `ainvoke`, with `invoke`'s direct path."""
        direct = direct_calls.direct_config(self, config, kwargs)
        if direct is None:
            return await super().ainvoke(input, config, stop=stop, **kwargs)
        result = await self._agenerate(direct_calls.messages_of(self, input), stop=stop,
                                       **direct_calls.model_kwargs(kwargs))
        return direct_calls.finish(result, direct)

    @_signed
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        if run_manager is not None and run_manager.handlers:  # callbacks see every delta
            builder, first, chunks = self._start_stream(messages, stop, run_manager, kwargs)
            with closing(chunks):
                result = generate_from_stream(itertools.chain([first] if first is not None else [], chunks))
            return _with_call_errors(result, builder)
        call = self._begin(kwargs)

        def attempt() -> ChatResult:
            request = self._attempt_request(call, messages, stop, kwargs)
            builder = request.reply_builder()
            self._collect_request(request, builder, call.deadline)
            return builder.result()

        return retries.retrying(self.max_retries)(attempt)

    @_signed
    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        if run_manager is not None and run_manager.handlers:  # callbacks see every delta
            builder, first, chunks = await self._astart_stream(messages, stop, run_manager, kwargs)
            async with aclosing(chunks):
                result = await agenerate_from_stream(_prepended(first, chunks))
            return _with_call_errors(result, builder)
        call = await self._abegin(kwargs)

        async def attempt() -> ChatResult:
            request = await self._aattempt_request(call, messages, stop, kwargs)
            builder = request.reply_builder()
            # The whole reply built once on the event loop: no chunk per delta, no executor hop as agenerate_from_stream
            await self._acollect_request(request, builder, call.deadline)
            return builder.result()

        return await retries.acall(self.max_retries, attempt)

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        _, first, chunks = self._start_stream(messages, stop, run_manager, kwargs)
        with closing(chunks):  # a consumer that stops after the first chunk ends the request now
            if first is not None:
                yield first
                yield from chunks

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any
                       ) -> AsyncIterator[ChatGenerationChunk]:
        _, first, chunks = await self._astart_stream(messages, stop, run_manager, kwargs)
        async with aclosing(chunks):
            async for chunk in _prepended(first, chunks):
                yield chunk

    def _start_stream(self, messages: list[BaseMessage], stop: list[str] | None,
                      run_manager: CallbackManagerForLLMRun | None, kwargs: dict[str, Any]
                      ) -> tuple[ReplyBuilder, ChatGenerationChunk | None, Iterator[ChatGenerationChunk]]:
        """Starts a streamed reply: (its builder, its first chunk or None, the chunks after it). Failures are retried
        only up to the first chunk: from then on the consumer and the callbacks have seen output, which a retry
        would send them again."""
        call = self._begin(kwargs)

        def start() -> tuple[ReplyBuilder, ChatGenerationChunk | None, Iterator[ChatGenerationChunk]]:
            request = self._attempt_request(call, messages, stop, kwargs)
            builder = request.reply_builder()
            chunks = self._stream_request(request, builder, call.deadline, run_manager)
            return builder, next(chunks, None), chunks

        return retries.retrying(self.max_retries)(start)

    async def _astart_stream(self, messages: list[BaseMessage], stop: list[str] | None,
                             run_manager: AsyncCallbackManagerForLLMRun | None, kwargs: dict[str, Any]
                             ) -> tuple[ReplyBuilder, ChatGenerationChunk | None, AsyncIterator[ChatGenerationChunk]]:
        """`_start_stream` for async callers."""
        call = await self._abegin(kwargs)

        async def start() -> tuple[ReplyBuilder, ChatGenerationChunk | None, AsyncIterator[ChatGenerationChunk]]:
            request = await self._aattempt_request(call, messages, stop, kwargs)
            builder = request.reply_builder()
            chunks = self._astream_request(request, builder, call.deadline, run_manager)
            return builder, await anext(chunks, None), chunks

        return await retries.aretrying(self.max_retries)(start)

    def _begin(self, kwargs: dict[str, Any]) -> _Call:
        """A call's engine, loaded first, then its deadline: loading is no part of `timeout`."""
        engine = self._engine(kwargs)
        return _Call(engine, _deadline(self.timeout))

    async def _abegin(self, kwargs: dict[str, Any]) -> _Call:
        """`_begin` for async callers (loading off the event loop)."""
        engine = await self._aengine(kwargs)
        return _Call(engine, _deadline(self.timeout))

    def _attempt_request(self, call: _Call, messages: list[BaseMessage], stop: list[str] | None,
                         kwargs: dict[str, Any]) -> _Request:
        """The request of one attempt of `call`; raises RequestTimeoutError when the call's deadline passed before
        it (retries do not renew the deadline)."""
        retries.remaining(call.deadline)
        if not call.engine.alive:  # it died in the attempt before: this one runs on a freshly loaded engine
            call.engine = self._engine(kwargs)
        return self._request(messages, stop, call.engine, kwargs)

    async def _aattempt_request(self, call: _Call, messages: list[BaseMessage], stop: list[str] | None,
                                kwargs: dict[str, Any]) -> _Request:
        """`_attempt_request` for async callers."""
        retries.remaining(call.deadline)
        if not call.engine.alive:
            call.engine = await self._aengine(kwargs)
        return self._request(messages, stop, call.engine, kwargs)

    def _stream_request(self, request: _Request, builder: ReplyBuilder, deadline: float | None,
                        run_manager: CallbackManagerForLLMRun | None) -> Iterator[ChatGenerationChunk]:
        """One attempt: pin the shared prefixes, then stream the reply, within `deadline` (time.monotonic())."""
        run_manager = run_manager if run_manager is not None and run_manager.handlers else None
        with closing(self._deltas(request, builder, deadline)) as deltas:  # an early stop ends the request now
            for delta in deltas:
                for chunk in builder.add(delta):
                    if run_manager:
                        run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk

    def _collect_request(self, request: _Request, builder: ReplyBuilder, deadline: float | None) -> None:
        """`_stream_request` for a caller that wants only the whole reply (`builder.result()`; no callbacks)."""
        if request.budget is None:
            # Woken once when the reply is done, not per delta; the whole text is one delta to the builder.
            self._pin(request, builder, deadline)
            with request.explain_errors():
                output = request.engine.generate(request.tokenized(), request.params,
                                                 timeout=retries.remaining(deadline))[0]
            builder.collect(output)
            return
        with closing(self._deltas(request, builder, deadline)) as deltas:
            for delta in deltas:
                builder.collect(delta)

    @classmethod
    def _deltas(cls, request: _Request, builder: ReplyBuilder, deadline: float | None) -> Iterator[Any]:
        cls._pin(request, builder, deadline)
        # closing(): a consumer that stops early cancels the request now, not when the generator is collected.
        with request.explain_errors(), closing(request.stream_deltas(retries.remaining(deadline))) as it:
            yield from it

    async def _astream_request(self, request: _Request, builder: ReplyBuilder, deadline: float | None,
                               run_manager: AsyncCallbackManagerForLLMRun | None
                               ) -> AsyncIterator[ChatGenerationChunk]:
        # No handlers, no per-delta callback (a dispatch per token is most of the adapter's cost per delta).
        run_manager = run_manager if run_manager is not None and run_manager.handlers else None
        await self._apin(request, builder, deadline)
        with request.explain_errors():
            async with aclosing(request.astream_deltas()) as it:
                while (delta := await retries.within(deadline, lambda: anext(it, None))) is not None:
                    for chunk in builder.add(delta):
                        if run_manager:
                            await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                        yield chunk

    async def _acollect_request(self, request: _Request, builder: ReplyBuilder, deadline: float | None) -> None:
        """`_astream_request` for a caller that wants only the whole reply (`builder.result()`; no callbacks)."""
        await self._apin(request, builder, deadline)
        with request.explain_errors():
            if request.budget is None:
                # Woken once when the reply is done, not per delta; the whole text is one delta to the builder.
                output = await retries.within(deadline, lambda: request.engine.agenerate(request.tokenized(),
                                                                                         request.params))
                builder.collect(output)
                return
            async with aclosing(request.astream_deltas()) as it:
                while (delta := await retries.within(deadline, lambda: anext(it, None))) is not None:
                    builder.collect(delta)

    @staticmethod
    def _pin(request: _Request, builder: ReplyBuilder, deadline: float | None) -> None:
        """Pins the request's shared prefixes (no engine round trip when they are pinned already)."""
        if request.segments:
            builder.max_cache_read = retries.call_within(
                deadline, lambda: pins_for(request.engine).pin(request.prompt, request.segments))

    @staticmethod
    async def _apin(request: _Request, builder: ReplyBuilder, deadline: float | None) -> None:
        """Pins the request's shared prefixes (no engine round trip when they are pinned already)."""
        if request.segments:
            pins = pins_for(request.engine)
            builder.max_cache_read = await retries.within(deadline, lambda: pins.apin(request.prompt,
                                                                                       request.segments))

    # --- token counting -----------------------------------------------------------------------------------------
    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of `text` with the model's own tokenizer (no special tokens added); loads the engine."""
        return list(self._engine({}).tokenizer(text, add_special_tokens=False)["input_ids"])

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """Prompt tokens of `messages` as ChatBraid renders them (chat template, `tools` included): the
        `input_tokens` that a call with these messages and tools reports."""
        kwargs = {"tools": to_openai_tools(tools)} if tools else {}
        return len(self._request(messages, None, self._engine(kwargs), kwargs).prompt)

    # --- tools and structured output ----------------------------------------------------------------------------
    def bind_tools(self, tools: Sequence[dict[str, Any] | type | Callable | BaseTool], *,
                   tool_choice: ToolChoice = None, strict: bool | None = None, parallel_tool_calls: bool | None = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Binds tools (anything `convert_to_openai_tool` accepts). `tool_choice`: None/"auto" (the model
        decides), "none", "any"/"required"/True (some tool must be called) or a tool name, also in the providers' dict
        forms (`{"type": "any"}`, `{"type": "function", "function": {"name": ...}}`, `{"type": "tool", "name": ...}`).
        `parallel_tool_calls=False`: at most one call per reply (later ones are dropped). Other keyword arguments
        are call arguments (e.g. `response_format`).

        What is constrained depends on `tool_choice`: a required call ("any"/"required"/True or a name) is decoded
        under a grammar of the tools' argument schemas, so unless cut short (max_tokens) it parses to a bound tool
        with arguments of its schema. In auto mode the model writes calls in free text and they are parsed, not
        constrained; a malformed call comes back in `invalid_tool_calls` with an `error` (with a `response_format`
        too, the reply is constrained to a call of a bound tool or the response object). `strict=True`: every call's
        arguments are also checked against its tool's schema, and a call that does not match is an invalid call
        whose `error` names the mismatch (a schema that is not valid JSON schema raises ValueError here)."""
        formatted = to_openai_tools(tools)
        normalize_tool_choice(tool_choice, tool_names(formatted))  # a bad choice fails here, not at the call
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        if strict:
            argument_validators(formatted)  # a schema jsonschema cannot use fails here, not at the call
            kwargs["strict"] = True
        return self.bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(self, schema: dict[str, Any] | type, *, include_raw: bool = False,
                               method: StructuredOutputMethod = "json_schema", strict: bool | None = None,
                               **kwargs: Any) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """Replies parsed into `schema` (pydantic class, TypedDict or JSON schema dict).

        method: "json_schema" (decoding constrained to the schema), "function_calling" (a forced, constrained
        tool call) or "json_mode" (constrained to some JSON object; say in the prompt which keys to use).
        Constrained decoding yields JSON of the schema, so `strict` changes nothing; a reply cut short (max_tokens,
        a stop sequence) raises OutputParserException (or with include_raw, is reported in "parsing_error").
        """
        if kwargs:
            raise ValueError(f"with_structured_output got unsupported arguments {sorted(kwargs)}")
        return structured_output(self, schema, method=method, include_raw=include_raw)

    # --- internals ----------------------------------------------------------------------------------------------
    def _engine(self, kwargs: dict[str, Any]) -> LLM:
        return engines.get_engine(kwargs.get("model", self.model), self.device, self.dtype, **self.engine_kwargs)

    async def _aengine(self, kwargs: dict[str, Any]) -> LLM:
        model = kwargs.get("model", self.model)
        if engines.is_loaded(model, self.device, self.dtype, **self.engine_kwargs):
            return engines.get_engine(model, self.device, self.dtype, **self.engine_kwargs)
        return await asyncio.to_thread(  # seconds of loading, off the event loop
            lambda: engines.get_engine(model, self.device, self.dtype, **self.engine_kwargs))

    def _request(self, messages: list[BaseMessage], stop: list[str] | None, engine: LLM,
                 kwargs: dict[str, Any]) -> _Request:
        """The one request builder: prompt token ids, sampling parameters and how to read the reply."""
        _check_call_args(kwargs)
        tools = _openai_tools(kwargs.get("tools") or [])
        if tools:
            choice = normalize_tool_choice(kwargs.get("tool_choice"), tool_names(tools))
        elif normalize_tool_choice(kwargs.get("tool_choice"), []) not in ("auto", "none"):
            raise ValueError(f"tool_choice {kwargs['tool_choice']!r} needs tools; bind them with bind_tools(...)")
        else:
            choice = "none"
        offered = tools if choice != "none" else []
        guided, tool_mode, schema_owner = kwargs.get("guided"), _tool_mode(choice, offered), None
        response = response_format_guided(kwargs.get("response_format"))
        if response is not None and guided is not None:
            raise ValueError("response_format cannot be combined with another `guided` constraint")
        shown = guided if guided is not None else response  # the schema the system prompt shows
        fmt = chat_format(engine.tokenizer)
        reasoning = kwargs.get("reasoning", self.reasoning)
        head, prompt, segments = _prompt_ids(engine, messages, offered, shown, kwargs.get("documents") or [],
                                             with_segments=self.pin_prefixes, reasoning=reasoning)
        if tool_mode == "forced":
            if guided is not None:
                raise ValueError("a required tool call (tool_choice) cannot be combined with another `guided` "
                                 "constraint")
            guided = _forced_call(fmt, forced_call_schema(offered, choice))
            schema_owner = f"the argument schema of tool(s) {tool_names(offered)}"
        elif response is not None and tool_mode == "auto":
            # The reply is either a tool call or the response object, both as constrained JSON.
            guided = _guided(json_schema=any_of_schemas([forced_call_schema(offered, "any"), _schema_of(response)]))
            schema_owner = f"response_format or the argument schema of tool(s) {tool_names(offered)}"
        elif response is not None:
            guided, schema_owner = response, "response_format"
        params = self._sampling_params(stop, guided, kwargs)
        max_calls = 1 if kwargs.get("parallel_tool_calls") is False else None
        max_thought = kwargs.get("max_reasoning_tokens", self.max_reasoning_tokens)
        prompt, opened, budget = thinking.plan_thought(engine.tokenizer, fmt.reasoning, prompt, reasoning,
                                                       max_thought, guided is not None or bool(params.stop))
        validators = argument_validators(offered) if kwargs.get("strict") and offered else None
        return _Request(_display_name(kwargs.get("model", self.model)), engine, prompt, params, tool_mode,
                        schema_owner, segments, max_calls, fmt, opened, budget, head, tool_names(offered), validators)

    def _sampling_params(self, stop: list[str] | None, guided: GuidedDecoding | None,
                         overrides: dict[str, Any]) -> SamplingParams:
        values = tuple(overrides.get(f, getattr(self, f)) for f in _SAMPLING_FIELDS)
        stop = stop if stop is not None else (self.stop or [])
        if guided is None and all(isinstance(v, _PLAIN) for v in values) and all(isinstance(s, str) for s in stop):
            # The same few settings call after call; keyed by type too, since 1 == 1.0 == True for the cache.
            return _plain_sampling_params(values, tuple(map(type, values)), tuple(stop))
        return _new_sampling_params(values, stop, guided)


_PLAIN = (int, float, type(None))  # sampling values that may key the cache below (bool is an int)


@functools.lru_cache(maxsize=256)
def _plain_sampling_params(values: tuple[Any, ...], types: tuple[type, ...], stop: tuple[str, ...]
                           ) -> SamplingParams:
    """SamplingParams (frozen, so shareable) built once per distinct settings: validating them costs tens of
    microseconds per call."""
    return _new_sampling_params(values, list(stop), None)


def _new_sampling_params(values: tuple[Any, ...], stop: list[str], guided: GuidedDecoding | None) -> SamplingParams:
    from braidinfer import SamplingParams

    return SamplingParams(**dict(zip(_SAMPLING_FIELDS, values)), stop=stop, guided=guided)


@dataclass
class _Call:
    """What the attempts of one call share: its engine (replaced where it died, for the retry) and its deadline
    (a `time.monotonic()` value, None = none)."""

    engine: LLM
    deadline: float | None


@dataclass(frozen=True)
class _Request:
    model_name: str
    engine: LLM
    prompt: list[int]
    params: SamplingParams
    tool_mode: ToolMode
    schema_owner: str | None  # whose JSON schema drives guided decoding, for error messages
    segments: list[tuple[int, str]]  # (end, kind) of the system prompt and documents in `prompt`, to pin; [] = none
    max_calls: int | None = None  # most tool calls kept from one reply (parallel_tool_calls=False: 1)
    chat: ChatFormat | None = None  # the model's tool-call and reasoning formats (None: defaults)
    opened: bool = False  # the prompt opens the thought (the reply starts inside it)
    budget: thinking.ThoughtBudget | None = None  # the reply is generated thought first, then answer
    head: tuple[int, ...] = ()  # the prompt's first ids, the tuple kept for its system prompt and documents (or ())
    tools: Sequence[str] | None = None  # the names of the tools offered (None: unknown)
    validators: Validators | None = None  # strict=True: each offered tool's argument check

    def tokenized(self) -> TokenizedPrompt:
        """The prompt for the engine: ids of its own tokenizer (`_prompt_ids` made them), so not checked one by one,
        and its head range-checked once per head, not once per call."""
        return TokenizedPrompt(self.prompt[len(self.head):], self.engine.tokenizer, head=self.head)

    def reply_builder(self) -> ReplyBuilder:
        calls = (self.chat.tools.parser(forced=self.tool_mode == "forced", tools=self.tools)
                 if self.chat is not None else None)
        builder = ReplyBuilder(self.model_name, self.tool_mode, max_calls=self.max_calls, calls=calls,
                               validators=self.validators)
        builder.caching = self.engine.config.enable_prefix_caching
        if self.chat is not None and self.chat.reasoning is not None:
            builder.thoughts = ThoughtSplitter(self.chat.reasoning, opened=self.opened)
        return builder

    def stream_deltas(self, timeout: float | None) -> Iterator[Any]:
        if self.budget is None:
            return self.engine.stream_deltas(self.tokenized(), self.params, timeout=timeout)
        return thinking.stream_deltas(self.engine, self.prompt, self.params, self.budget, timeout)

    def astream_deltas(self) -> AsyncIterator[Any]:
        if self.budget is None:
            return self.engine.astream_deltas(self.tokenized(), self.params)
        return thinking.astream_deltas(self.engine, self.prompt, self.params, self.budget)

    @contextmanager
    def explain_errors(self) -> Iterator[None]:
        """Names the tools when the engine cannot compile their schema (its message names only the grammar)."""
        from braidinfer.errors import GrammarCompileError, InvalidRequestError

        try:
            yield
        except GrammarCompileError as e:
            if self.schema_owner is None:
                raise
            raise InvalidRequestError(f"{self.schema_owner} cannot be used for constrained decoding: {e}") from e


def _prompt_ids(engine: LLM, messages: list[BaseMessage], tools: list[dict[str, Any]], guided: Any,
                documents: Sequence[Any], with_segments: bool = True, reasoning: bool | None = None
                ) -> tuple[tuple[int, ...], list[int], list[tuple[int, str]]]:
    """(head, prompt, segments): renders the conversation with the model's chat template. Tools go through the
    template when it renders them (in the family's way, see `chat_format.template_inputs`), else into the system
    prompt; a JSON schema constraint and documents go after the system prompt. `head`: the ids the prompt starts
    with, as the tuple kept for them (see `prompt_cache.split_prompt_ids`).

    With `with_segments`, also returns where the system prompt and each document end in the prompt, as (token
    count, kind), found by `braid_langchain.pinning.segment_heads` (else [])."""
    fmt = chat_format(engine.tokenizer)
    native = fmt.tools.native
    base = [tool_prompt(tools) if tools and not native else "", schema_prompt(guided)]
    docs = sort_documents(documents)
    chat = to_chat_messages(messages, inline_tool_calls=history_calls(fmt.tools),
                            system_extras=[*base, render_sorted_documents(docs)],
                            call_id=lambda call_id: history_call_id(fmt.tools, call_id))
    chat, template_kwargs = template_inputs(fmt, chat, tools, reasoning)
    head, prompt = split_prompt_ids(engine, chat, template_kwargs)
    if not with_segments or not chat or chat[0]["role"] != "system":
        return head, prompt, []
    return head, prompt, segment_heads(engine, prompt, messages, base, docs, template_kwargs, head)


def _openai_tools(tools: Any) -> list[dict[str, Any]]:
    """A call's `tools` as OpenAI tool dicts (what `bind_tools` passes, as is; anything else converted)."""
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"tools must be a list of tools, got {type(tools).__name__}")
    if all(isinstance(t, dict) and isinstance(t.get("function"), dict) for t in tools):
        return list(tools)
    return to_openai_tools(tools)


def _tool_mode(choice: str, offered: list[dict[str, Any]]) -> ToolMode:
    if not offered:
        return "off"
    return "auto" if choice == "auto" else "forced"


def _check_call_args(kwargs: dict[str, Any]) -> None:
    unknown = sorted(set(kwargs) - _CALL_ARGS - _IGNORED_CALL_ARGS)
    if unknown:
        raise ValueError(f"ChatBraid got unknown call argument(s) {unknown}; it accepts {sorted(_CALL_ARGS)}")
    if "max_reasoning_tokens" in kwargs:  # the field's own check does not see call arguments: the same one here
        budget = kwargs["max_reasoning_tokens"]
        try:
            kwargs["max_reasoning_tokens"] = _REASONING_BUDGET.validate_python(budget)
        except ValidationError:
            raise ValueError(f"max_reasoning_tokens must be an int >= 1 (or None), got {budget!r}") from None


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


async def _prepended(first: ChatGenerationChunk | None, rest: AsyncIterator[ChatGenerationChunk]
                     ) -> AsyncIterator[ChatGenerationChunk]:
    """`first` (unless None, which ends the stream), then `rest`."""
    if first is not None:
        yield first
        async for chunk in rest:
            yield chunk


def _with_call_errors(result: ChatResult, builder: ReplyBuilder) -> ChatResult:
    """Puts back the reasons of invalid tool calls, which LangChain's merging of the streamed chunks drops."""
    for generation in result.generations:
        generation.message = with_errors(generation.message, builder.errors)
    return result


def _schema_of(guided: GuidedDecoding) -> dict[str, Any]:
    if guided.json_schema is not None:
        return guided.json_schema if isinstance(guided.json_schema, dict) else json.loads(guided.json_schema)
    return {"type": "object"}  # json_object


def _forced_call(fmt: ChatFormat, call_schema: dict[str, Any]) -> GuidedDecoding:
    """A forced call in the family's own format: its fixed text around the constrained JSON (a structural tag)."""
    call_schema = rename_arguments(call_schema, fmt.tools.args_key)
    tag = forced_call_tag(fmt.tools, call_schema, fmt.single_tokens)
    return _guided(structural_tag=tag) if tag is not None else _guided(json_schema=call_schema)


def _guided(**constraint: Any) -> GuidedDecoding:
    from braidinfer.guided import GuidedDecoding

    return GuidedDecoding(**constraint)


def _display_name(model: str | None) -> str:
    return EMBEDDED_MODEL_NAME if model is None else model
