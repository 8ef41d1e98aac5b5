"""Encoding a conversation into token ids safely: text the caller passes never becomes a special token.

The chat template renders a conversation as text in which the model's special tokens (`<|im_start|>`, `<|im_end|>`,
...) frame each message. Tokenizing that text parses every special-token string in it, those typed inside a message
or a tool's description too, so a user who writes `<|im_end|>` would end their own turn and could write the
assistant's. Here each special-token string inside the data the template renders (every string of the messages, of
`tools` and of `documents`, dict keys included; roles may hold none) is swapped for a private-use placeholder
character before rendering; the rendered text is tokenized as usual with the pieces that hold placeholders (the text
between the template's own special tokens) tokenized with special tokens split into ordinary pieces, the placeholders
put back first. A conversation without such strings is tokenized in one piece, exactly as the template's text always
was.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from braidinfer.errors import InvalidRequestError

# Supplementary Private Use Area-B: no tokenizer or template gives these characters a meaning.
_PLACEHOLDER_BASE = 0x100000
# Template arguments that hold data, rendered like message contents (Hugging Face's names for them).
_DATA_KWARGS = ("tools", "documents")


def require_valid_unicode(text: str, what: str) -> None:
    """Raises InvalidRequestError naming `what` when `text` cannot be encoded as UTF-8 (an unpaired surrogate such
    as '\\ud800', typically from text decoded with errors='surrogateescape' or sliced between a surrogate pair)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(
            f"{what} contains an unpaired surrogate {text[e.start]!r} at character {e.start}; text must be valid "
            "Unicode (decode bytes with errors='replace', or join surrogate pairs)") from None


def encode_conversation(tokenizer: Any, messages: list[dict[str, Any]], **template_kwargs: Any) -> list[int]:
    """Token ids of `messages` rendered by the tokenizer's chat template (`template_kwargs` go to the template;
    add_generation_prompt defaults to True, or to False with continue_final_message=True, which it cannot be combined
    with: the assistant's last message then ends the prompt, open for the model to go on). Special-token strings
    inside the messages (contents, tool calls, ...) and inside `tools` and `documents` are encoded as plain text.
    Raises InvalidRequestError for an empty conversation, a malformed message, invalid Unicode, a tokenizer without a
    template, or a template that cannot render the messages."""
    _check_messages(messages)
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidRequestError("the model's tokenizer has no chat template")
    template_kwargs.setdefault("add_generation_prompt", not template_kwargs.get("continue_final_message", False))
    specials = special_token_strings(tokenizer)
    for i, message in enumerate(messages):  # a role is part of the template's frame: it cannot be escaped
        if any(s in message["role"] for s in specials):
            raise InvalidRequestError(f"message {i} role {message['role']!r} contains a special token")
    data = {"messages": messages, **{k: template_kwargs[k] for k in _DATA_KWARGS if k in template_kwargs}}
    typed = [s for s in specials if any(s in text for text in _strings(data))]
    if not typed:
        return _encode(tokenizer, _render(tokenizer, messages, template_kwargs))
    placeholders = _placeholders(typed, _strings(data))
    escaped = _escape(data, placeholders)
    messages, template_kwargs = escaped.pop("messages"), {**template_kwargs, **escaped}
    return _encode_escaped(tokenizer, _render(tokenizer, messages, template_kwargs), specials, placeholders)


def special_token_strings(tokenizer: Any) -> list[str]:
    """The tokenizer's special-token strings, longest first (those that `split_special_tokens` splits)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    strings = {t.content for t in added.values() if getattr(t, "special", False)}
    strings.update(getattr(tokenizer, "all_special_tokens", []) or [])
    return sorted((s for s in strings if s), key=lambda s: (-len(s), s))


def has_system_role(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a system message (True without a template). Gemma's templates
    raise on one; their documentation puts the system text in the first user turn instead (see `fold_system`)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return True
    probe = [{"role": "system", "content": "system"}, {"role": "user", "content": "user"}]
    try:
        _render(tokenizer, probe, {"add_generation_prompt": True})
    except InvalidRequestError:
        return False
    return True


def fold_system(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`chat` without system messages, for templates without a system role: the leading one's text put before the
    first user message's (a user message is created when the conversation has none), any later one made a user
    turn (to be joined with the user turns beside it where a template wants roles to alternate)."""
    if not chat:
        return chat
    rest = [{**m, "role": "user"} if m["role"] == "system" else m for m in chat[1:]]
    if chat[0]["role"] != "system":
        return [chat[0], *rest]
    system = chat[0]["content"]
    if not system:
        return rest
    if rest and rest[0]["role"] == "user":
        return [{**rest[0], "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
    return [{"role": "user", "content": system}, *rest]


# --- validation and rendering ------------------------------------------------------------------------------------
def _check_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError("messages is empty" if not messages else
                                  f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise InvalidRequestError(f"message {i} must be a dict with a string 'role', got {message!r:.80}")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidRequestError(f"message {i} content must be a string or a list of content blocks, got "
                                      f"{type(content).__name__}")
        require_valid_unicode(message["role"], f"message {i} role")
        for text in _content_texts(message):
            require_valid_unicode(text, f"message {i} ({message['role']}) content")


def _render(tokenizer: Any, messages: list[dict[str, Any]], template_kwargs: dict[str, Any]) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **template_kwargs)
    except Exception as e:  # jinja errors: a template that cannot render these messages
        raise InvalidRequestError(f"the chat template cannot render these messages: {e}") from e
    require_valid_unicode(text, "the rendered conversation")  # e.g. surrogates in tool arguments
    return text


def _encode(tokenizer: Any, text: str, split_special_tokens: bool = False) -> list[int]:
    if not text:
        return []
    kwargs = {"split_special_tokens": True} if split_special_tokens else {}
    try:
        return list(tokenizer(text, add_special_tokens=False, **kwargs)["input_ids"])
    except Exception as e:  # the tokenizer's own failure, named instead of surfacing from deep inside it
        raise InvalidRequestError(f"the tokenizer cannot encode the conversation: {type(e).__name__}: {e}") from e


# --- message contents --------------------------------------------------------------------------------------------
def _content_texts(message: Mapping[str, Any]) -> list[str]:
    """The texts of a message's content: a string, or the text blocks of a content list."""
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [b["text"] for b in content if isinstance(b, Mapping) and isinstance(b.get("text"), str)]
    return []


# --- escaping ----------------------------------------------------------------------------------------------------
def _strings(value: Any) -> Iterator[str]:
    """Every string inside `value`: nested dicts (keys too), lists and tuples. (Roles hold no special-token
    string by now, so escaping leaves them as they are.)"""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def _placeholders(typed: list[str], texts: Iterable[str]) -> dict[str, str]:
    """One private-use character per special-token string found in the data, none occurring in any of `texts`."""
    used = {ch for text in texts for ch in text if ord(ch) >= _PLACEHOLDER_BASE}
    free = (chr(c) for c in range(_PLACEHOLDER_BASE, 0x10FFFE) if chr(c) not in used)
    return {s: next(free) for s in typed}


def _escape(value: Any, placeholders: dict[str, str]) -> Any:
    """`value` with every special-token string in its strings (as `_strings` finds them) swapped for its placeholder;
    dicts, lists and tuples are copied, everything else (numbers, a tool given as a function) is kept as is."""
    if isinstance(value, str):
        for special, placeholder in placeholders.items():  # longest first: a longer one is never cut by a shorter
            value = value.replace(special, placeholder)
        return value
    if isinstance(value, Mapping):
        return {_escape(k, placeholders): _escape(v, placeholders) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escape(item, placeholders) for item in value]
    return value


def _encode_escaped(tokenizer: Any, text: str, specials: list[str], placeholders: dict[str, str]) -> list[int]:
    """Tokenizes the rendered, escaped text. It is cut at the template's own special tokens; each piece between two
    of them that holds a placeholder is tokenized alone with special tokens split, its literals put back; the rest
    is tokenized as usual, consecutive pieces together."""
    literal_of = {p: s for s, p in placeholders.items()}
    pieces = re.split("(" + "|".join(map(re.escape, specials)) + ")", text)
    ids: list[int] = []
    plain = ""  # consecutive pieces without placeholders, tokenized in one call
    for piece in pieces:
        if not any(p in piece for p in literal_of):
            plain += piece
            continue
        ids += _encode(tokenizer, plain)
        plain = ""
        ids += _encode(tokenizer, "".join(literal_of.get(ch, ch) for ch in piece), split_special_tokens=True)
    return ids + _encode(tokenizer, plain)
