"""Request building: validates a prompt and its sampling parameters and builds the engine's `Sequence` for it.

Safe from any thread: it reads only what is fixed once the engine is built (tokenizer, context length, pool size)
and never touches engine state, so a bad request fails in its caller's thread before any work is queued."""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from braidinfer.chat_template import require_valid_unicode
from braidinfer.config import EngineConfig
from braidinfer.detokenizer import IncrementalDetokenizer
from braidinfer.errors import InvalidRequestError, UnsupportedModelError
from braidinfer.outputs import CompletionDelta
from braidinfer.sampling.guided import GrammarCompiler
from braidinfer.sampling.sampler import make_generator
from braidinfer.sampling_params import SamplingParams
from braidinfer.sequence import ComposedSegment, Sequence, kv_tokens
from braidinfer.tokenized_prompt import CheckedHeads, TokenizedPrompt

Sink = Callable[[CompletionDelta], None]


@dataclass(frozen=True)
class RequestLimits:
    """What every request must fit in: discovered when the engine is built, fixed afterwards."""

    vocab_size: int
    max_model_len: int
    """Longest prompt plus output, in tokens."""
    num_pages: int
    page_size: int
    max_pinned_pages: int
    """Most pages that chunks may pin together."""
    cannot_shift_keys: str | None = None
    """Why the model cannot move a chunk's keys to another position (composed prompts), or None when it can."""


class RequestBuilder:
    def __init__(self, config: EngineConfig, tokenizer, limits: RequestLimits, grammars: GrammarCompiler,
                 device: torch.device, generator: torch.Generator):
        self.config, self.tokenizer, self.limits = config, tokenizer, limits
        self.grammars, self.device, self.generator = grammars, device, generator
        self._ids = itertools.count()
        self._checked_heads = CheckedHeads(limits.vocab_size)

    def tokenize(self, prompt: str | list[int] | TokenizedPrompt, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt (a string is encoded with the tokenizer's special tokens, e.g. BOS, unless
        `add_special_tokens` is False: a prompt that continues after chunks). A `TokenizedPrompt` of this engine's
        tokenizer has only its range checked (its head once per head object); one of another tokenizer is checked like
        a list."""
        _check_prompt_type(prompt)
        return self._tokenize(prompt, add_special_tokens)

    def _tokenize(self, prompt: str | list[int] | TokenizedPrompt, add_special_tokens: bool = True) -> list[int]:
        """`tokenize` of a prompt whose type was checked."""
        if isinstance(prompt, TokenizedPrompt):
            if prompt.tokenizer is not self.tokenizer:
                return self._tokenize(prompt.ids())
            return self._own_ids(prompt)
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            require_valid_unicode(prompt, "prompt")
            try:
                return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
            except Exception as e:  # named here rather than surfacing from deep inside the tokenizer
                raise InvalidRequestError(f"the tokenizer cannot encode the prompt: {type(e).__name__}: {e}") from e
        ids = list(prompt)
        if not ids:
            raise InvalidRequestError("prompt is empty")
        vocab = self.limits.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token ids must be ints in [0, {vocab}); got {bad[:5]}")
        return ids

    def _own_ids(self, prompt: TokenizedPrompt) -> list[int]:
        """A copy of ids this engine's tokenizer produced, after the range check that is all they need (a head
        object that passed it before is not checked again)."""
        head, token_ids = prompt.head, prompt.token_ids
        if not head and not token_ids:
            raise InvalidRequestError("prompt is empty")
        if not self._ints_in_range(token_ids) or (head and not self._checked_heads.valid(head)):
            return self._tokenize(prompt.ids())  # the list check, which names the bad ids
        return prompt.ids()

    def _ints_in_range(self, ids: list[int]) -> bool:
        """Whether every id is an int in [0, vocab_size), checked by `sum`, `min` and `max`, which run in C: a float
        (or a numpy scalar) among ints makes the sum a float (a numpy scalar), anything else makes it fail."""
        if not ids:
            return True
        try:
            total = sum(ids)
        except TypeError:
            return False
        return type(total) is int and min(ids) >= 0 and max(ids) < self.limits.vocab_size

    def sequence(self, prompt: str | list[int] | TokenizedPrompt, params: SamplingParams | None = None,
                 sink: Sink | None = None, request_id: str | None = None, prefix: list[int] | None = None,
                 compose: list[ComposedSegment] | None = None) -> Sequence:
        """Validates a request and builds its sequence.

        `prefix`: token ids the prompt continues (chunks); the prompt may then be empty and a string prompt gets no
        leading special tokens. `compose`: the independent chunks whose KV stands for prefix tokens (a composed
        prompt, approximate: private KV, never cached)."""
        _check_prompt_type(prompt)
        if compose and not len(prompt):
            raise InvalidRequestError("a prompt composed from independent chunks needs some text after them")
        if compose and self.limits.cannot_shift_keys and any(segment.position for segment in compose):
            raise UnsupportedModelError(self.limits.cannot_shift_keys)
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be SamplingParams, got {type(params).__name__}")
        if prefix:
            ids = prefix + (self._tokenize(prompt, add_special_tokens=False) if len(prompt) else [])
        else:
            ids = self._tokenize(prompt)
        max_model_len = self.limits.max_model_len
        if len(ids) >= max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens but the model's context is {max_model_len} tokens "
                "(prompt plus at least one generated token must fit)")
        max_tokens = min(params.max_tokens, max_model_len - len(ids))
        capacity = self.limits.num_pages * self.limits.page_size
        need = kv_tokens(len(ids), max_tokens)
        if need > capacity:
            raise InvalidRequestError(
                f"request needs up to {need} tokens of KV cache ({len(ids)} prompt + "
                f"{max_tokens} output tokens, the last never fed back) but the page pool holds {capacity}; "
                "lower max_tokens or give the engine more KV memory")
        seq = Sequence(request_id or f"req-{next(self._ids)}", ids, params, max_tokens, sink)
        if compose:
            seq.private, seq.compose = True, list(compose)
        seq.generator = make_generator(params.seed, self.device) if params.seed is not None else self.generator
        seq.detokenizer = IncrementalDetokenizer(
            self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens, stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output)
        if params.guided is not None:
            seq.matcher = self.grammars.matcher(params.guided)
        return seq

    def prefill(self, token_ids: list[int], pin_owner: str, sink: Sink | None = None,
                private: bool = False) -> Sequence:
        """A request that computes the KV of `token_ids` and pins its full pages for `pin_owner` (a chunk's id),
        sampling nothing. `private`: computed on its own at positions 0.., outside the prefix cache, keeping every
        page (an independent chunk for composed prompts)."""
        ids = self.tokenize(token_ids)
        if not self.config.enable_prefix_caching:
            raise InvalidRequestError("chunks need the prefix cache: create the LLM with enable_prefix_caching=True")
        limits = self.limits
        if len(ids) > limits.max_model_len:
            raise InvalidRequestError(f"chunk prefix has {len(ids)} tokens but the model's context is "
                                      f"{limits.max_model_len} tokens")
        pages = -(-len(ids) // limits.page_size) if private else len(ids) // limits.page_size
        if pages > limits.max_pinned_pages:
            raise InvalidRequestError(
                f"chunk prefix of {len(ids)} tokens needs {pages} pinned KV pages but chunks may pin at most "
                f"{limits.max_pinned_pages} of the pool's {limits.num_pages} (max_pinned_fraction="
                f"{self.config.max_pinned_fraction})")
        seq = Sequence(f"prefill-{next(self._ids)}", ids, SamplingParams(max_tokens=1), 0, sink, prefill_only=True)
        seq.private, seq.pin_owner = private, pin_owner
        return seq


def _check_prompt_type(prompt) -> None:
    """Raises InvalidRequestError unless `prompt` is of a type a prompt can be, before anything takes its length; of a
    TokenizedPrompt, that its ids are in a list or tuple (not a numpy array or tensor: those convert with .tolist())."""
    if isinstance(prompt, TokenizedPrompt):
        for field in ("head", "token_ids"):
            ids = getattr(prompt, field)
            if not isinstance(ids, (list, tuple)):
                hint = " (convert it with .tolist())" if hasattr(ids, "tolist") else ""
                raise InvalidRequestError(
                    f"TokenizedPrompt.{field} must be a list of ints, got {type(ids).__name__}{hint}")
    elif not isinstance(prompt, (str, list, tuple)):
        raise InvalidRequestError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
