"""`with_structured_output` for ChatBraid: guided decoding makes the JSON valid, a LangChain parser reads it."""
from __future__ import annotations

import json
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Literal

from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
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

    is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
    trace = {"ls_structured_output_format": {"kwargs": {"method": method}, "schema": schema}}
    if method == "function_calling":
        name = convert_to_openai_tool(schema)["function"]["name"]
        llm = model.bind_tools([schema], tool_choice=name, **trace)
        parser: Runnable = (PydanticToolsParser(tools=[schema], first_tool_only=True) if is_pydantic
                            else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
    elif method in ("json_schema", "json_mode"):
        guided = (GuidedDecoding(json_schema=close_objects(_json_schema(schema)))
                  if method == "json_schema" else GuidedDecoding(json_object=True))
        llm = model.bind(guided=guided, **trace)
        parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
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
