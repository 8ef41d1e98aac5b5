"""`with_structured_output` for ChatBraid: guided decoding makes the JSON valid, a LangChain parser reads it."""
from __future__ import annotations

import builtins
import json
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Literal

from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage
from langchain_core.outputs import Generation
from langchain_core.runnables import Runnable, RunnableLambda, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

from braid_langchain.tools import close_objects

if TYPE_CHECKING:
    from braid_langchain.chat_models import ChatBraid

StructuredOutputMethod = Literal["json_schema", "function_calling", "json_mode"]


def structured_output(model: ChatBraid, schema: dict[str, Any] | type, *, method: StructuredOutputMethod,
                      include_raw: bool) -> Runnable:
    """model | parser, or with include_raw a map to {"raw", "parsed", "parsing_error"}."""
    from braidinfer.guided import GuidedDecoding

    if isinstance(schema, type) and getattr(builtins, schema.__name__, None) is schema:
        # LangChain would read the type's signature: "no signature found for builtin type", or for some a schema of
        # its constructor's arguments.
        raise ValueError(f"schema must be a pydantic model class, a TypedDict, a JSON schema dict or a function, got "
                         f"the built-in type {schema.__name__}; wrap it in a model, e.g. `class Answer(BaseModel): "
                         f"value: {schema.__name__}`")
    is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
    trace = {"ls_structured_output_format": {"kwargs": {"method": method}, "schema": schema}}
    if method == "function_calling":
        name = convert_to_openai_tool(schema)["function"]["name"]
        llm = model.bind_tools([schema], tool_choice=name, **trace)
        parser: Runnable = RunnableLambda(require_valid_call) | (
            PydanticToolsParser(tools=[schema], first_tool_only=True) if is_pydantic
            else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
    elif method in ("json_schema", "json_mode"):
        guided = (GuidedDecoding(json_schema=close_objects(_json_schema(schema)))
                  if method == "json_schema" else GuidedDecoding(json_object=True))
        llm = model.bind(guided=guided, **trace)
        parser = _CompletePydanticParser(pydantic_object=schema) if is_pydantic else _CompleteJsonParser()
    else:
        raise ValueError(f"method must be 'json_schema', 'function_calling' or 'json_mode', got {method!r}")
    if not include_raw:
        return llm | parser
    parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
    failed = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=llm) | parsed.with_fallbacks([failed], exception_key="parsing_error")


def schema_prompt(guided: Any) -> str:
    """System-prompt text showing the JSON schema a guided reply must match ("" for other constraints)."""
    schema = getattr(guided, "json_schema", None)
    if schema is None:
        return ""
    text = schema if isinstance(schema, str) else json.dumps(schema, ensure_ascii=False)
    return f"Answer with only a JSON object that matches this JSON schema:\n{text}"


def _json_schema(schema: dict[str, Any] | type) -> dict[str, Any]:
    """A JSON schema dict is used as given (it needs no title); classes and OpenAI tool dicts are converted."""
    if isinstance(schema, dict) and "function" not in schema and "parameters" not in schema:
        return schema
    return convert_to_json_schema(schema)


def require_valid_call(message: AIMessage) -> AIMessage:
    """`message` as is when it holds a valid tool call; OutputParserException saying why the call is invalid (e.g.
    cut by max_tokens) or missing otherwise, where LangChain's tool parsers would return None without a word."""
    if message.tool_calls:
        return message
    if not message.invalid_tool_calls:  # e.g. a reasoning model's thought used up max_tokens
        finish = message.response_metadata.get("finish_reason")
        hint = "; raise max_tokens, or bound the thought with max_reasoning_tokens" if finish == "length" else ""
        raise OutputParserException(f"the reply has no tool call (finish_reason {finish!r}{hint})",
                                    llm_output=str(message.content))
    call = message.invalid_tool_calls[0]
    reason = call.get("error") or f"finish_reason {message.response_metadata.get('finish_reason')!r}"
    raise OutputParserException(f"the tool call {call.get('name')!r} is invalid: {reason}",
                                llm_output=call.get("args") or "")


class _Complete:
    """A LangChain JSON parser that refuses a whole reply that is not complete JSON (cut by max_tokens or a stop
    sequence), where the parser alone would read the part as a truncated object. Streamed partial objects
    (`partial=True`) pass as before."""

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        if not partial and result:
            text = result[0].text
            try:
                json.loads(text, strict=False)
            except ValueError as e:
                message = getattr(result[0], "message", None)
                finish = message.response_metadata.get("finish_reason") if message is not None else None
                hint = "; raise max_tokens" if finish == "length" else ""
                raise OutputParserException(f"the reply is not complete JSON (finish_reason {finish!r}{hint}): {e}",
                                            llm_output=text) from None
        return super().parse_result(result, partial=partial)


class _CompleteJsonParser(_Complete, JsonOutputParser):
    pass


class _CompletePydanticParser(_Complete, PydanticOutputParser):
    pass


def response_format_guided(response_format: Any) -> Any:
    """The `GuidedDecoding` for an OpenAI-style `response_format` (None when it asks for nothing):
    `{"type": "text"}`, `{"type": "json_object"}`, `{"type": "json_schema", "json_schema": {"schema": ...}}`, or
    a schema given directly (pydantic class, TypedDict, JSON schema dict)."""
    from braidinfer.guided import GuidedDecoding

    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return GuidedDecoding(json_object=True)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError('response_format {"type": "json_schema"} needs "json_schema": {"schema": {...}}, got '
                             f"{response_format!r:.200}")
        return GuidedDecoding(json_schema=close_objects(spec["schema"]))
    if kind is not None and not ("properties" in response_format or "$defs" in response_format):
        raise ValueError(f"response_format type {kind!r} is not supported; use 'text', 'json_object' or "
                         "'json_schema', or pass a schema")
    try:
        return GuidedDecoding(json_schema=close_objects(_json_schema(response_format)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"response_format must be an OpenAI response_format dict or a schema: {e}") from e
