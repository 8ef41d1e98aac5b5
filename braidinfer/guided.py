"""What a grammar-constrained request asks for: a JSON schema, any JSON object, an EBNF grammar or a regex restricts
which tokens may be sampled, so even a small model emits output that parses. The spec only (torch-free); the
compiler and the token masks are in `braidinfer.sampling.guided`."""
from __future__ import annotations

import json
from typing import Any, ClassVar

from pydantic import model_validator

from braidinfer.validation import ValidatedModel


class GuidedDecoding(ValidatedModel):
    """Exactly one constraint. json_schema: a JSON schema (dict or JSON text); json_object: any JSON object;
    grammar: EBNF (GBNF) text with a `root` rule; regex: a regular expression the whole output must match;
    structural_tag: an xgrammar structural tag (dict or JSON text, `{"type": "structural_tag", "format": ...}`),
    e.g. fixed text around a JSON schema, as a model's own tool-call format needs."""

    error_prefix: ClassVar[str] = "invalid guided decoding"

    json_schema: dict[str, Any] | str | None = None
    json_object: bool = False
    grammar: str | None = None
    regex: str | None = None
    structural_tag: dict[str, Any] | str | None = None

    @classmethod
    def describe_error(cls, error: dict[str, Any]) -> str:
        return error["msg"]

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [self.json_schema is not None, self.json_object, self.grammar is not None, self.regex is not None,
                 self.structural_tag is not None]
        if sum(given) != 1:
            raise ValueError("guided decoding takes exactly one of json_schema, json_object, grammar, regex, "
                             "structural_tag")
        return self

    def key(self) -> tuple:
        """Equal for constraints that compile to the same grammar. Key order counts: a schema's properties are
        generated in the order it lists them."""
        return (_text(self.json_schema), self.json_object, self.grammar, self.regex, _text(self.structural_tag))


def _text(spec: dict[str, Any] | str | None) -> str | None:
    return spec if isinstance(spec, str) or spec is None else json.dumps(spec)
