"""ChatBraid: a LangChain chat model on the local Braid engine, reusing the KV of shared prompt prefixes."""
from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import aclosing, closing, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from pydantic import ConfigDict, model_validator
from typing_extensions import Self

from braid_langchain import engines
from braid_langchain.chunks import ChunkBuilder, ToolMode
from braid_langchain.documents import render_documents, sort_documents
from braid_langchain.messages import to_chat_messages
from braid_langchain.pinning import pins_for, segment_ends
from braid_langchain.structured import StructuredOutputMethod, schema_prompt, structured_output
from braid_langchain.tools import (
    ToolChoice,
    forced_call_schema,
    normalize_tool_choice,
    template_supports_tools,
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
_CALL_ARGS = frozenset({"tools", "tool_choice", "guided", "documents", "model", *_SAMPLING_FIELDS})
_IGNORED_CALL_ARGS = frozenset({"stream", "ls_structured_output_format"})  # LangChain's own routing hints


class ChatBraid(BaseChatModel):
    """Chat with a local model through the Braid engine.

    System prompts, documents and earlier turns (answers included) that repeat across calls are served from the
    engine's KV cache; `usage_metadata["input_token_details"]["cache_read"]` says how many prompt tokens were.

    Call arguments (via `invoke(..., **kwargs)` or `.bind(...)`): `documents` (retrieved `Document`s, rendered
    after the system prompt in a stable order, see `braid_langchain.documents`), `guided` (a
    `braidinfer.guided.GuidedDecoding` constraint; a JSON schema is also shown to the model in the system
    prompt, since a model that has not seen the schema fills it poorly), `model` (another model for this call),
    and the sampling fields below.

    Example: `ChatBraid(temperature=0).invoke("Name a colour.").content`
    """

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    """A local model directory, a `.gguf` file or a hub id in the local cache; None = embedded SmolLM2-135M-Instruct."""
    device: str | None = None
    """"cpu", "cuda" or "cuda:N"; None picks CUDA when available."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and KV dtype; auto = bfloat16 on CUDA, float32 on CPU."""
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
    streaming: bool = False
    """Route `invoke` through streaming so callbacks see every token."""
    pin_prefixes: bool = True
    """Pin the system prompt and each document as engine chunks, so they stay computed under memory pressure
    (see `braid_langchain.pinning`); reuse is exact either way."""

    @model_validator(mode="after")
    def _validate(self) -> Self:
        from braidinfer.config import EngineConfig

        EngineConfig(model=self.model, device=self.device, dtype=self.dtype)  # device, dtype: no engine is loaded
        self._sampling_params(None, None, {})  # the engine's own rules for every sampling field
        return self

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
                **{f: getattr(self, f) for f in _SAMPLING_FIELDS}, "stop": self.stop}

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
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        request = self._request(messages, stop, self._engine(kwargs), kwargs)
        if request.segments:
            pins_for(request.engine).pin(request.prompt, request.segments)
        builder = ChunkBuilder(request.model_name, request.tool_mode)
        # closing(): a consumer that stops early cancels the request now, not when the generator is collected.
        with request.explain_errors(), closing(request.engine.stream_deltas(request.prompt, request.params)) as it:
            for completion in it:
                for chunk in builder.add(completion):
                    if run_manager:
                        run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any
                       ) -> AsyncIterator[ChatGenerationChunk]:
        request = self._request(messages, stop, await self._aengine(kwargs), kwargs)
        if request.segments:
            await pins_for(request.engine).apin(request.prompt, request.segments)
        builder = ChunkBuilder(request.model_name, request.tool_mode)
        with request.explain_errors():
            async with aclosing(request.engine.astream_deltas(request.prompt, request.params)) as it:
                async for completion in it:
                    for chunk in builder.add(completion):
                        if run_manager:
                            await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                        yield chunk

    # --- tools and structured output ----------------------------------------------------------------------------
    def bind_tools(self, tools: Sequence[dict[str, Any] | type | Callable | BaseTool], *,
                   tool_choice: ToolChoice = None, **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Binds tools (anything `convert_to_openai_tool` accepts). `tool_choice`: None/"auto" (the model
        decides), "none", "any"/"required"/True (some tool must be called) or a tool name; a required call is
        produced with constrained decoding, so it always parses."""
        formatted = to_openai_tools(tools)
        normalize_tool_choice(tool_choice, tool_names(formatted))  # a bad choice fails here, not at the call
        return self.bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(self, schema: dict[str, Any] | type, *, include_raw: bool = False,
                               method: StructuredOutputMethod = "json_schema", strict: bool | None = None,
                               **kwargs: Any) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """Replies parsed into `schema` (pydantic class, TypedDict or JSON schema dict).

        method: "json_schema" (decoding constrained to the schema), "function_calling" (a forced, constrained
        tool call) or "json_mode" (constrained to some JSON object; say in the prompt which keys to use).
        Constrained decoding always yields valid JSON, so `strict` changes nothing.
        """
        if kwargs:
            raise ValueError(f"with_structured_output got unsupported arguments {sorted(kwargs)}")
        return structured_output(self, schema, method=method, include_raw=include_raw)

    # --- internals ----------------------------------------------------------------------------------------------
    def _engine(self, kwargs: dict[str, Any]) -> LLM:
        return engines.get_engine(kwargs.get("model", self.model), self.device, self.dtype)

    async def _aengine(self, kwargs: dict[str, Any]) -> LLM:
        model = kwargs.get("model", self.model)
        if engines.is_loaded(model, self.device, self.dtype):
            return engines.get_engine(model, self.device, self.dtype)
        return await asyncio.to_thread(engines.get_engine, model, self.device, self.dtype)  # seconds of loading

    def _request(self, messages: list[BaseMessage], stop: list[str] | None, engine: LLM,
                 kwargs: dict[str, Any]) -> _Request:
        """The one request builder: prompt token ids, sampling parameters and how to read the reply."""
        _check_call_args(kwargs)
        tools = kwargs.get("tools") or []
        choice = normalize_tool_choice(kwargs.get("tool_choice"), tool_names(tools)) if tools else "none"
        offered = tools if choice != "none" else []
        guided, tool_mode, schema_owner = kwargs.get("guided"), _tool_mode(choice, offered), None
        prompt, segments = _prompt_ids(engine, messages, offered, guided, kwargs.get("documents") or [],
                                       with_segments=self.pin_prefixes)
        if tool_mode == "forced":
            if guided is not None:
                raise ValueError("a required tool call (tool_choice) cannot be combined with another `guided` "
                                 "constraint")
            guided = _guided(json_schema=forced_call_schema(offered, choice))
            schema_owner = f"the argument schema of tool(s) {tool_names(offered)}"
        params = self._sampling_params(stop, guided, kwargs)
        return _Request(_display_name(kwargs.get("model", self.model)), engine, prompt, params, tool_mode,
                        schema_owner, segments)

    def _sampling_params(self, stop: list[str] | None, guided: GuidedDecoding | None,
                         overrides: dict[str, Any]) -> SamplingParams:
        from braidinfer import SamplingParams

        values = {f: overrides.get(f, getattr(self, f)) for f in _SAMPLING_FIELDS}
        return SamplingParams(**values, stop=stop if stop is not None else (self.stop or []), guided=guided)


@dataclass(frozen=True)
class _Request:
    model_name: str
    engine: LLM
    prompt: list[int]
    params: SamplingParams
    tool_mode: ToolMode
    schema_owner: str | None  # whose JSON schema drives guided decoding, for error messages
    segments: list[tuple[int, str]]  # (end, kind) of the system prompt and documents in `prompt`, to pin; [] = none

    @contextmanager
    def explain_errors(self) -> Iterator[None]:
        """Names the tools when the engine cannot compile their schema (its message names only the grammar)."""
        from braidinfer.errors import InvalidRequestError

        try:
            yield
        except InvalidRequestError as e:
            if self.schema_owner is None or "cannot be compiled" not in str(e):
                raise
            raise InvalidRequestError(f"{self.schema_owner} cannot be used for constrained decoding: {e}") from e


def _prompt_ids(engine: LLM, messages: list[BaseMessage], tools: list[dict[str, Any]], guided: Any,
                documents: Sequence[Any], with_segments: bool = True) -> tuple[list[int], list[tuple[int, str]]]:
    """Renders the conversation with the model's chat template. Tools go through the template when it renders
    them, else into the system prompt; a JSON schema constraint and documents go after the system prompt.

    With `with_segments`, also returns where the system prompt and each document end in the prompt, as (token
    count, kind): each is the common prefix of the prompt with the leading system message rendered alone, without
    documents and then with the first 1, 2, ... of them (else [], and those renderings are skipped)."""
    native = template_supports_tools(getattr(engine.tokenizer, "chat_template", None))
    template_kwargs = {"tools": tools} if tools and native else {}
    base = [tool_prompt(tools) if tools and not native else "", schema_prompt(guided)]
    docs = sort_documents(documents)
    chat = to_chat_messages(messages, inline_tool_calls=not native, system_extras=[*base, render_documents(docs)])
    prompt = engine.apply_chat_template(chat, **template_kwargs)
    if not with_segments or not chat or chat[0]["role"] != "system":
        return prompt, []
    lead = list(itertools.takewhile(lambda m: m.type == "system", messages))
    heads = []
    for i in range(len(docs) + 1):
        head = to_chat_messages(lead, system_extras=[*base, render_documents(docs[:i])])
        if head:
            ids = engine.apply_chat_template(head, add_generation_prompt=False, **template_kwargs)
            heads.append((ids, "document" if i else "system"))
    return prompt, segment_ends(prompt, heads)


def _tool_mode(choice: str, offered: list[dict[str, Any]]) -> ToolMode:
    if not offered:
        return "off"
    return "auto" if choice == "auto" else "forced"


def _check_call_args(kwargs: dict[str, Any]) -> None:
    unknown = sorted(set(kwargs) - _CALL_ARGS - _IGNORED_CALL_ARGS)
    if unknown:
        raise ValueError(f"ChatBraid got unknown call argument(s) {unknown}; it accepts {sorted(_CALL_ARGS)}")


def _guided(**constraint: Any) -> GuidedDecoding:
    from braidinfer.guided import GuidedDecoding

    return GuidedDecoding(**constraint)


def _display_name(model: str | None) -> str:
    return EMBEDDED_MODEL_NAME if model is None else model
