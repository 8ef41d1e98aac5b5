"""Braid's inference engine: paged KV cache with exact prefix reuse, continuous batching, streaming.

    from braidinfer import LLM, SamplingParams
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "LLM": "braidinfer.llm",
    "EngineConfig": "braidinfer.config",
    "SamplingParams": "braidinfer.sampling_params",
    "RequestOutput": "braidinfer.outputs",
    "CompletionDelta": "braidinfer.outputs",
    "Usage": "braidinfer.outputs",
    "BraidError": "braidinfer.errors",
    "InvalidRequestError": "braidinfer.errors",
    "GuidedDecoding": "braidinfer.guided",
    "TokenizedPrompt": "braidinfer.tokenized_prompt",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from braidinfer.config import EngineConfig
    from braidinfer.errors import BraidError, InvalidRequestError
    from braidinfer.guided import GuidedDecoding
    from braidinfer.llm import LLM
    from braidinfer.outputs import CompletionDelta, RequestOutput, Usage
    from braidinfer.sampling_params import SamplingParams
    from braidinfer.tokenized_prompt import TokenizedPrompt


def __getattr__(name: str):
    # Lazy, so that importing one submodule (or `braid --help`) does not load torch and transformers.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'braidinfer' has no attribute {name!r}")
