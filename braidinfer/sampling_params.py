"""Per-request sampling parameters, validated before the request is scheduled."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import ConfigDict, Field, field_validator

from braidinfer.guided import GuidedDecoding
from braidinfer.validation import ValidatedModel

# Temperatures below this are treated as 0: dividing logits by them can overflow float32, and the
# distribution they describe is argmax anyway.
GREEDY_TEMPERATURE = 1e-5

MAX_LOGPROBS = 20

# What each field accepts, in words, for error messages.
_ALLOWED = {
    "temperature": "a finite number >= 0 (0 means greedy)",
    "top_k": "an integer: 0 or -1 (off), or >= 1",
    "top_p": "a finite number in (0, 1]",
    "min_p": "a finite number in [0, 1]",
    "seed": f"an integer in [{-(2**63)}, {2**63 - 1}], or null",
    "max_tokens": "an integer >= 1",
    "stop": "a string or a list of strings",
    "stop_token_ids": "a list of integers >= 0",
    "ignore_eos": "a boolean",
    "logprobs": f"an integer in [0, {MAX_LOGPROBS}], or null (off)",
    "skip_special_tokens": "a boolean",
    "include_stop_str_in_output": "a boolean",
    "repetition_penalty": "a finite number > 0 (1 = off)",
    "presence_penalty": "a finite number in [-2, 2]",
    "frequency_penalty": "a finite number in [-2, 2]",
    "guided": "a GuidedDecoding (json_schema, json_object, grammar or regex), or null",
}


class SamplingParams(ValidatedModel):
    """How to pick the tokens of one request and when to stop it.

    Invalid values raise `InvalidRequestError` naming the field and what it accepts.
    """

    # strict: no silent coercion of True to 1 or "0.5" to 0.5; allow_inf_nan: NaN passes every
    # range check by comparing False, so it must be rejected explicitly.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)
    error_prefix: ClassVar[str] = ""  # each problem names its sampling parameter

    temperature: float = Field(1.0, ge=0.0)
    """Divides the logits before sampling; below 1e-5 the request is greedy; above 1e6 it counts as 1e6."""
    top_k: int = Field(0, ge=-1)
    """Keep the k most likely tokens and those tied with the k-th (with top-p too, its nucleus breaks such ties);
    0 or -1 = off."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    max_tokens: int = Field(256, ge=1)
    stop: list[str] = []
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = []
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    """Report the chosen token's logprob and the top-n alternatives', of the model's own distribution: before
    penalties, grammar masks, temperature and filters (as vLLM by default). None = off."""
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    repetition_penalty: float = Field(1.0, gt=0.0)
    """Divides positive logits (multiplies negative ones) of tokens already in the prompt or output; 1 = off. Taken
    within [1e-6, 1e6]."""
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    """Subtracted from the logits of tokens already generated."""
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    """Subtracted from each token's logit once per time it was generated."""
    guided: GuidedDecoding | None = None
    """Grammar-constrained decoding: the output must match this JSON schema / grammar / regex."""

    @classmethod
    def describe_error(cls, error: dict[str, Any]) -> str:
        field = str(error["loc"][0]) if error["loc"] else "sampling parameters"
        if error["type"] == "extra_forbidden":
            return f"unknown sampling parameter {field!r}"
        if field in _ALLOWED:
            return f"sampling parameter {field!r} must be {_ALLOWED[field]}; got {error['input']!r}"
        return f"{field}: {error['msg']}"

    @field_validator("stop", mode="before")
    @classmethod
    def _normalize_stop(cls, value: Any) -> Any:
        # An empty stop string would match at every position and end every request at once.
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            return [s for s in value if s != ""]
        return value

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _normalize_stop_token_ids(cls, value: Any) -> Any:
        if value is None:
            return []
        return list(value) if isinstance(value, tuple) else value

    @property
    def penalized(self) -> bool:
        """True when any repetition, presence or frequency penalty is set."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def greedy(self) -> bool:
        """True when the request always takes the most likely token (temperature 0)."""
        return self.temperature < GREEDY_TEMPERATURE

