"""`invoke` / `ainvoke` without LangChain's per-call run machinery when nothing would observe it.

For every call LangChain's `invoke` builds a callback manager, reports the run's start and end to its handlers,
checks the LLM cache and the rate limiter, and routes to streaming when a handler wants tokens. With no handler,
cache or limiter, all of that changes nothing in the reply but costs about a third of ChatBraid's host work per call
under concurrent load (benchmarks/langchain_overhead.py), on the thread that also feeds the engine.

A call goes direct only when LangChain itself would find nothing to do: `CallbackManager.configure`, as the full path
calls it, finds no handler (none in the config or on the model, no verbose, tracing, debug or context hooks), no
cache or rate limiter applies, output_version is not "v1", and the call does not ask to stream. It then goes
straight to `_generate` / `_agenerate` with the messages LangChain would pass, and the message is finished as
`_generate_with_cache` finishes it: id `lc_run-<run id>-0`, response metadata merged from the generation info.
Anything else, or a langchain-core whose internals these names no longer match, takes LangChain's own path.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from langchain_core.callbacks import CallbackManager
from langchain_core.globals import get_llm_cache
from langchain_core.runnables.config import RunnableConfig, ensure_config

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel, LanguageModelInput
    from langchain_core.messages import AIMessage, BaseMessage
    from langchain_core.outputs import ChatResult

try:  # what `agenerate` / `_agenerate_with_cache` apply to the messages and the reply
    from langchain_core.language_models._utils import _normalize_messages
    from langchain_core.language_models.chat_models import _gen_info_and_msg_metadata
    from langchain_core.utils.utils import LC_ID_PREFIX
    from langchain_core.utils.uuid import uuid7
except ImportError:  # another langchain-core: every call takes LangChain's path
    _normalize_messages = None

_ROUTING_ARGS = ("ls_structured_output_format", "structured_output_format")
"""Call arguments `agenerate` takes out before the model sees the rest (tracing hints of with_structured_output)."""


def direct_config(model: BaseChatModel, config: RunnableConfig | None, kwargs: dict[str, Any]
                  ) -> RunnableConfig | None:
    """The call's config (ensured) when it can skip LangChain's run machinery, else None."""
    if _normalize_messages is None or kwargs.get("stream") or getattr(model, "streaming", False):
        return None
    if model.rate_limiter is not None or model.output_version == "v1":
        return None
    if model.cache is not False and (model.cache is not None or get_llm_cache() is not None):
        return None
    config = ensure_config(config)
    manager = CallbackManager.configure(config.get("callbacks"), model.callbacks, model.verbose, config.get("tags"),
                                        model.tags, config.get("metadata"), model.metadata)
    if manager.handlers or manager.inheritable_handlers:
        return None
    return config


def messages_of(model: BaseChatModel, input: LanguageModelInput) -> list[BaseMessage]:
    """The messages LangChain's path hands to `_generate` for `input`."""
    return _normalize_messages(model._convert_input(input).to_messages())


def model_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call arguments LangChain's path hands to `_generate`."""
    return {k: v for k, v in kwargs.items() if k not in _ROUTING_ARGS}


def finish(result: ChatResult, config: RunnableConfig) -> AIMessage:
    """The reply of a direct call, as LangChain's path returns it."""
    generation = result.generations[0]
    if generation.message.id is None:
        generation.message.id = f"{LC_ID_PREFIX}-{config.pop('run_id', None) or uuid7()}-0"
    generation.message.response_metadata = _gen_info_and_msg_metadata(generation)
    if len(result.generations) == 1 and result.llm_output is not None:
        generation.message.response_metadata = {**result.llm_output, **generation.message.response_metadata}
    return generation.message
