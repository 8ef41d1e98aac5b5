"""Prompt token ids without re-tokenizing the shared system prompt and documents on every call.

Tokenizing a 1.5k-token system prompt with documents takes milliseconds of the caller's thread per call, most of
ChatBraid's host work per request (measured with benchmarks/langchain_overhead.py). The rendered conversation is
cut where a special token of the template begins after the system message (`<|im_end|>`, ...): a tokenizer splits
its input at special tokens before anything else, so the ids of the text before the cut do not depend on the text
after it. Those ids are kept per engine, keyed by that text, and each call tokenizes only the rest.

Used only where it is exact: when no message holds a special-token string (those need the escaping of
`braidinfer.chat_template.encode_conversation`), and for a given head text only after the first call has checked
that the split ids equal the ids of the whole text (a tokenizer for which they differ keeps the whole-text path).

The head's ids are kept as one tuple, which the prompt carries on (`split_prompt_ids`): the engine range-checks a
head tuple once (`braidinfer.tokenized_prompt`), pinning compares the head renderings with it once
(`braid_langchain.pinning`), and prompts of one head share its int objects, so comparing two of them is mostly
identity checks.

A plain conversation (string roles and contents, no template argument but the reasoning switch) is rendered with
the compiled template directly: transformers' `apply_chat_template` around it converts and copies every message and
argument first, which for such a conversation changes nothing and cost ~30 of the ~45 us of each render (measured
on a 2-core CPU host). The first such render per template is checked against the wrapper's.
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
_PROBE_CHARS = 64  # see _find
_PLAIN_MESSAGE_KEYS = frozenset({"role", "content"})
_PLAIN_TEMPLATE_KWARGS = frozenset({"enable_thinking"})

_caches: weakref.WeakKeyDictionary[Any, _HeadIds] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


class _HeadIds:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.specials = special_token_strings(tokenizer)
        # A fast tokenizer's Rust backend, called directly: the wrapper's batch call costs more than the short tail
        # it encodes, and releases the GIL, which a caller then waits to get back from the busy engine thread.
        self.backend = _rust_backend(tokenizer)
        self.ids: OrderedDict[str, tuple[int, ...] | None] = OrderedDict()  # None: the split is not exact here
        self.clean: OrderedDict[str, None] = OrderedDict()  # long texts known to hold no special-token string
        self.compile = _template_compiler(tokenizer)  # None: every render goes through the wrapper
        self.direct: tuple[str, bool] | None = None  # (template, whether its direct render equalled the wrapper's)
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

    def render(self, chat: list[dict[str, Any]], template_kwargs: dict[str, Any]) -> str:
        """`tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **template_kwargs)`;
        a plain conversation rendered with the compiled template directly (see the module docstring)."""
        template = self.tokenizer.chat_template
        if self.compile is None or not isinstance(template, str) or not _plain(chat, template_kwargs):
            return self._wrapped_render(chat, template_kwargs)
        special = self.tokenizer.special_tokens_map
        agreed = self.direct[1] if self.direct is not None and self.direct[0] is template else None
        if agreed is False or not _plain_special_tokens(special):
            return self._wrapped_render(chat, template_kwargs)
        # What the wrapper hands the template for such a conversation: these values, template arguments last.
        text = self.compile(template).render(messages=chat, tools=None, documents=None, add_generation_prompt=True,
                                             **{**special, **template_kwargs})
        if agreed is None:  # the first direct render of this template
            wrapped = self._wrapped_render(chat, template_kwargs)
            self.direct = (template, text == wrapped)
            return wrapped
        return text

    def _wrapped_render(self, chat: list[dict[str, Any]], template_kwargs: dict[str, Any]) -> str:
        return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **template_kwargs)

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        if self.backend is not None:
            return self.backend.encode(text, add_special_tokens=False).ids
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(llm: Any, chat: list[dict[str, Any]], template_kwargs: dict[str, Any]) -> list[int]:
    """`llm.apply_chat_template(chat, **template_kwargs)`, reusing the ids of the leading system message."""
    return split_prompt_ids(llm, chat, template_kwargs)[1]


def split_prompt_ids(llm: Any, chat: list[dict[str, Any]], template_kwargs: dict[str, Any]
                     ) -> tuple[tuple[int, ...], list[int]]:
    """(head, ids): `prompt_ids`, and the head's ids that they start with, as the tuple kept for that head (the same
    object on every call that reuses it; () when the conversation was encoded whole)."""
    cache = _cache_for(llm)
    system = chat[0].get("content") if chat and chat[0]["role"] == "system" else None
    if not isinstance(system, str) or len(chat) < 2 or _has_specials(chat, template_kwargs, cache):
        return (), llm.apply_chat_template(chat, **template_kwargs)
    try:
        text = cache.render(chat, template_kwargs)
    except Exception:  # let the normal path raise its own, clearer error
        return (), llm.apply_chat_template(chat, **template_kwargs)
    cut = _cut(text, system, cache.specials)
    if cut is None:
        return (), llm.apply_chat_template(chat, **template_kwargs)
    head = text[:cut]
    with cache.lock:
        known = head in cache.ids
        head_ids = cache.ids.get(head)
        if known:
            cache.ids.move_to_end(head)
    if known and head_ids is None:
        return (), llm.apply_chat_template(chat, **template_kwargs)
    if known:
        tail = text[cut:]
        require_valid_unicode(tail, "the rendered conversation")
        return head_ids, [*head_ids, *cache.encode(tail)]
    full = llm.apply_chat_template(chat, **template_kwargs)
    split, tail_ids = cache.encode(head), cache.encode(text[cut:])
    exact = full[: len(split)] == split and full[len(split):] == tail_ids
    head_ids = tuple(split) if exact else None
    with cache.lock:
        cache.ids[head] = head_ids
        while len(cache.ids) > MAX_HEADS:
            cache.ids.popitem(last=False)
    if head_ids is None:
        return (), full
    return head_ids, [*head_ids, *tail_ids]  # equal to `full`, in the head's own int objects


def _cut(text: str, system: str, specials: list[str]) -> int | None:
    """Where the first special token after the system message's content begins (None when there is none)."""
    start = _find(text, system)
    if start < 0 or not system:
        return None
    end = start + len(system)
    found = [i for i in (text.find(s, end) for s in specials) if i >= 0]
    return min(found) if found else None


def _find(text: str, needle: str) -> int:
    """`text.find(needle)`. Every occurrence of the needle starts with an occurrence of its first characters, so the
    first occurrence of those, when the whole needle is there, is the first of the needle: found without `find`'s
    preprocessing of the whole needle, ~8 us for a 7.6k-character system prompt with its document."""
    start = text.find(needle[:_PROBE_CHARS])
    if start < 0 or text.startswith(needle, start):
        return start
    return text.find(needle, start + 1)


def _has_specials(chat: list[dict[str, Any]], template_kwargs: dict[str, Any], cache: _HeadIds) -> bool:
    # Every field a template may render: content, tool calls, reasoning_content, Phi-4-mini's system `tools`.
    texts = [v if isinstance(v, str) else repr(v) for m in chat for k, v in m.items() if k != "role" and v]
    texts.append(repr(template_kwargs))
    return any(cache.has_specials(t) for t in texts)


def _plain(chat: list[dict[str, Any]], template_kwargs: dict[str, Any]) -> bool:
    """Whether transformers' wrapper hands the template these very values: messages of a string role and content
    only (nothing to drop, convert or alias), and no template argument but a boolean reasoning switch."""
    return (template_kwargs.keys() <= _PLAIN_TEMPLATE_KWARGS and all(type(v) is bool for v in template_kwargs.values())
            and all(m.keys() <= _PLAIN_MESSAGE_KEYS and all(type(v) is str for v in m.values()) for m in chat))


def _plain_special_tokens(special: dict[str, Any]) -> bool:
    return all(type(v) is str or (type(v) is list and all(type(t) is str for t in v)) for v in special.values())


def _template_compiler(tokenizer: Any) -> Any:
    """transformers' compiler of chat templates (cached per template string there, with its sandbox and globals),
    when `apply_chat_template` is the base class's; else None (another transformers, or a tokenizer of its own)."""
    try:
        from transformers import PreTrainedTokenizerBase
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return None
    cls = type(tokenizer)
    if (getattr(cls, "apply_chat_template", None) is not PreTrainedTokenizerBase.apply_chat_template
            or getattr(cls, "get_chat_template", None) is not PreTrainedTokenizerBase.get_chat_template):
        return None
    return _compile_jinja_template


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
