"""One base for the engine's validated settings (EngineConfig, SamplingParams, GuidedDecoding): frozen pydantic
models whose validation errors reach the caller as one readable `InvalidRequestError`, never a pydantic trace."""
from __future__ import annotations

import numbers
import operator
from collections.abc import Mapping
from typing import Any, ClassVar

import pydantic
from pydantic import BaseModel, ConfigDict

from braidinfer.errors import InvalidRequestError


class ValidatedModel(BaseModel):
    """A frozen model that rejects unknown fields; bad values raise InvalidRequestError naming each field.

    Subclasses set `error_prefix` (what the message starts with; empty for none) and may override `describe_error`
    for field-specific wording. An integer of another type (numpy's) is taken as the int it stands for."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    error_prefix: ClassVar[str] = "invalid settings"

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except pydantic.ValidationError as exc:
            raise self._request_error(exc) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Any:
        """Like `BaseModel.model_validate`, raising `InvalidRequestError` on bad values."""
        try:
            return super().model_validate(obj, **kwargs)
        except pydantic.ValidationError as exc:
            raise cls._request_error(exc) from None

    @classmethod
    def model_validate_json(cls, json_data: str | bytes, **kwargs: Any) -> Any:
        """Like `BaseModel.model_validate_json`, raising `InvalidRequestError` on bad values."""
        try:
            return super().model_validate_json(json_data, **kwargs)
        except pydantic.ValidationError as exc:
            raise cls._request_error(exc) from None

    @pydantic.field_validator("*", mode="before")
    @classmethod
    def _plain_integers(cls, value: Any) -> Any:
        # An integer of another type (numpy's, torch's) is the int it stands for: strict fields would refuse it.
        if isinstance(value, numbers.Integral) and not isinstance(value, (int, bool)):
            return operator.index(value)
        return value

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Any:
        """A copy with `update`'s fields changed and checked as at construction (pydantic's own `model_copy` checks
        nothing, so it would pass on e.g. a negative temperature); InvalidRequestError on bad values."""
        copy = super().model_copy(deep=deep)
        if not update:
            return copy
        return type(self)(**{name: getattr(copy, name) for name in type(self).model_fields} | dict(update))

    def __setattr__(self, name: str, value: Any) -> None:
        if name in type(self).model_fields:
            raise AttributeError(f"{type(self).__name__} is immutable: make a changed copy with "
                                 f".model_copy(update={{{name!r}: ...}})")
        if not name.startswith("_"):
            raise AttributeError(f"{type(self).__name__} has no field {name!r}, and is immutable")
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name in type(self).model_fields:
            raise AttributeError(f"{type(self).__name__} is immutable: its field {name!r} cannot be deleted")
        super().__delattr__(name)

    @classmethod
    def describe_error(cls, error: dict[str, Any]) -> str:
        """One failed check in words (pydantic's error dict: loc, msg, type, input)."""
        if not error["loc"]:  # a check of the whole model: its message says what is wrong
            return error["msg"]
        loc = ".".join(str(x) for x in error["loc"])
        return f"{loc}: {error['msg']} (got {error.get('input')!r})"

    @classmethod
    def _request_error(cls, exc: pydantic.ValidationError) -> InvalidRequestError:
        # pydantic words a validator's ValueError as "Value error, <its message>": the message alone is meant.
        errors = [{**e, "msg": e["msg"].removeprefix("Value error, ")} for e in exc.errors(include_url=False)]
        # model_validate runs the overridden __init__ for dict input, so its InvalidRequestError arrives here
        # wrapped once more by pydantic.
        if len(errors) == 1 and isinstance(errors[0].get("ctx", {}).get("error"), InvalidRequestError):
            return errors[0]["ctx"]["error"]
        problems = "; ".join(cls.describe_error(e) for e in errors)
        return InvalidRequestError(f"{cls.error_prefix}: {problems}" if cls.error_prefix else problems)
