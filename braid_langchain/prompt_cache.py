"""Prompt token ids without re-tokenizing the shared system prompt and documents on every call.

Tokenizing a 1.5k-token system prompt with documents takes milliseconds of the caller's thread per call, most of
ChatBraid's host work per request (measured with benchmarks/langchain_overhead.py). The rendered conversation is
cut where a special token of the template begins after the system message (`<|im_end|>`, ...): a tokenizer splits
its input at special tokens before anything else, so the ids of the text before the cut do not depend on the text
after it. Those ids are kept per engine, keyed by that text, and each call tokenizes only the rest.

Used only where it is exact: when no message holds a special-token string (those need the escaping of
`braidinfer.chat_template.encode_conversation`), and for a given head text only after the first call has checked
that the split ids equal the ids of the whole text (a tokenizer for which they differ keeps the whole-text path).
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any

from braidinfer.chat_template import require_valid_unicode, special_token_strings

MAX_HEADS = 64
"""Most head texts whose token ids are kept per engine."""

_SCANNED_MIN_CHARS = 256  # shorter texts are scanned every time (cheaper than hashing them into the memo)

_caches: weakref.WeakKeyDictionary[Any, _HeadIds] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


class _HeadIds:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.specials = special_token_strings(tokenizer)
        # A fast tokenizer's Rust backend, called directly: the wrapper's batch call costs more than the short tail
        # it encodes, and releases the GIL, which a caller then waits to get back from the busy engine thread.
        self.backend = _rust_backend(tokenizer)
        self.ids: OrderedDict[str, list[int] | None] = OrderedDict()  # None: the split is not exact here
        self.clean: OrderedDict[str, None] = OrderedDict()  # long texts known to hold no special-token string
        self.lock = threading.Lock()

    def has_specials(self, text: str) -> bool:
        """Whether `text` holds a special-token string; long texts found clean are remembered (the system prompt
        with its documents, scanned once instead of once per special token on every call)."""
        if len(text) < _SCANNED_MIN_CHARS:
            return any(s in text for s in self.specials)
        with self.lock:
            if text in self.clean:
                self.clean.move_to_end(text)
                return False
        if any(s in text for s in self.specials):
            return True
        with self.lock:
            self.clean[text] = None
            while len(self.clean) > MAX_HEADS:
                self.clean.popitem(last=False)
        return False

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        if self.backend is not None:
            return self.backend.encode(text, add_special_tokens=False).ids
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(llm: Any, chat: list[dict[str, Any]], template_kwargs: dict[str, Any]) -> list[int]:
    """`llm.apply_chat_template(chat, **template_kwargs)`, reusing the ids of the leading system message."""
    cache = _cache_for(llm)
    system = chat[0].get("content") if chat and chat[0]["role"] == "system" else None
    if not isinstance(system, str) or len(chat) < 2 or _has_specials(chat, template_kwargs, cache):
        return llm.apply_chat_template(chat, **template_kwargs)
    try:
        text = llm.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **template_kwargs)
    except Exception:  # let the normal path raise its own, clearer error
        return llm.apply_chat_template(chat, **template_kwargs)
    cut = _cut(text, system, cache.specials)
    if cut is None:
        return llm.apply_chat_template(chat, **template_kwargs)
    head = text[:cut]
    with cache.lock:
        known = head in cache.ids
        head_ids = cache.ids.get(head)
        if known:
            cache.ids.move_to_end(head)
    if known and head_ids is None:
        return llm.apply_chat_template(chat, **template_kwargs)
    if known:
        tail = text[cut:]
        require_valid_unicode(tail, "the rendered conversation")
        return head_ids + cache.encode(tail)
    full = llm.apply_chat_template(chat, **template_kwargs)
    split = cache.encode(head)
    exact = full[: len(split)] == split and full[len(split):] == cache.encode(text[cut:])
    with cache.lock:
        cache.ids[head] = split if exact else None
        while len(cache.ids) > MAX_HEADS:
            cache.ids.popitem(last=False)
    return full


def _cut(text: str, system: str, specials: list[str]) -> int | None:
    """Where the first special token after the system message's content begins (None when there is none)."""
    start = text.find(system)
    if start < 0 or not system:
        return None
    end = start + len(system)
    found = [i for i in (text.find(s, end) for s in specials) if i >= 0]
    return min(found) if found else None


def _has_specials(chat: list[dict[str, Any]], template_kwargs: dict[str, Any], cache: _HeadIds) -> bool:
    # Every field a template may render: content, tool calls, reasoning_content, Phi-4-mini's system `tools`.
    texts = [v if isinstance(v, str) else repr(v) for m in chat for k, v in m.items() if k != "role" and v]
    texts.append(repr(template_kwargs))
    return any(cache.has_specials(t) for t in texts)


def _rust_backend(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` behind a transformers fast tokenizer that adds nothing of its own (else None)."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "_tokenizer", None)
    if not isinstance(backend, Tokenizer) or backend.truncation is not None or backend.padding is not None:
        return None
    return backend if getattr(type(tokenizer), "_encode_plus", None) is _fast_encode_plus() else None


def _fast_encode_plus() -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast._encode_plus


def _cache_for(llm: Any) -> _HeadIds:
    with _lock:
        cache = _caches.get(llm)
        if cache is None:
            cache = _caches[llm] = _HeadIds(llm.tokenizer)
        return cache
