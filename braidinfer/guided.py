"""What a grammar-constrained request asks for: a JSON schema, any JSON object, an EBNF grammar or a regex restricts
which tokens may be sampled, so even a small model emits output that parses. The spec only (torch-free); the
compiler and the token masks are in `braidinfer.sampling.guided`."""
from __future__ import annotations

import json
from typing import Any

from typing import ClassVar

from pydantic import model_validator

from braidinfer.validation import ValidatedModel


class GuidedDecoding(ValidatedModel):
    """Exactly one constraint. json_schema: a JSON schema (dict or JSON text); json_object: any JSON object;
    grammar: EBNF (GBNF) text with a `root` rule; regex: a regular expression the whole output must match."""

    error_prefix: ClassVar[str] = "invalid guided decoding"

    json_schema: dict[str, Any] | str | None = None
    json_object: bool = False
    grammar: str | None = None
    regex: str | None = None

    @classmethod
    def describe_error(cls, error: dict[str, Any]) -> str:
        return error["msg"]

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [self.json_schema is not None, self.json_object, self.grammar is not None, self.regex is not None]
        if sum(given) != 1:
            raise ValueError("guided decoding takes exactly one of json_schema, json_object, grammar, regex")
        return self

    def key(self) -> tuple:
        schema = self.json_schema if isinstance(self.json_schema, str) or self.json_schema is None else json.dumps(
            self.json_schema, sort_keys=True)
        return (schema, self.json_object, self.grammar, self.regex)
