"""Errors raised by the engine for problems the caller can fix.

Every user mistake (a bad path, an invalid parameter, a prompt that cannot fit) raises a subclass of
`BraidError` with a message that names the problem, before any work is scheduled.
"""
from __future__ import annotations


class BraidError(Exception):
    """Base class of all errors the engine raises on purpose."""


class ModelNotFoundError(BraidError, FileNotFoundError):
    """The model path, hub id or file does not exist locally."""


class InvalidModelError(BraidError, ValueError):
    """The path exists but does not hold a model the engine can load."""


class UnsupportedModelError(BraidError, ValueError):
    """The model's architecture or a feature of it is not supported."""


class InvalidRequestError(BraidError, ValueError):
    """A prompt or a sampling parameter is invalid (empty, too long, out of range)."""


class GrammarCompileError(InvalidRequestError):
    """A guided-decoding constraint (JSON schema, grammar, regex) cannot be compiled to a grammar."""


class OutOfPagesError(BraidError, RuntimeError):
    """The KV page pool cannot hold what was asked of it."""


class PinWouldStarveError(OutOfPagesError):
    """A chunk's pin was refused for now: it would take pages that a started request needs to finish (the pin budget
    itself had room). Pinning again once that request has ended can succeed."""


class EngineDeadError(BraidError, RuntimeError):
    """The engine loop stopped; requests that were waiting on it fail with this error."""


class RequestFailedError(BraidError, RuntimeError):
    """One request failed inside the engine; the engine itself keeps serving."""


class RequestTimeoutError(BraidError, TimeoutError):
    """A request ran past the deadline its caller gave; it was aborted and its KV pages freed."""

    @classmethod
    def after(cls, timeout: float) -> RequestTimeoutError:
        """The error of a request aborted when its `timeout` seconds ran out."""
        return cls(f"the request ran past its {timeout:.3g} s deadline and was aborted")
