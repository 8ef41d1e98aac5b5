"""Grammar-constrained decoding with xgrammar: compiles a `GuidedDecoding` for the model's tokenizer and masks the
tokens each row's grammar forbids."""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import torch

from braidinfer.errors import GrammarCompileError
from braidinfer.guided import GuidedDecoding


CACHED_GRAMMARS = 64
"""Compiled constraints a GrammarCompiler keeps (least recently used dropped first): a server whose requests each
bring a new schema would otherwise grow without bound."""


class GrammarCompiler:
    """Compiles constraints for one tokenizer (cached by constraint) and hands out a fresh matcher per request."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        self._tokenizer, self._vocab_size, self._stop_token_ids = tokenizer, vocab_size, stop_token_ids
        self._compiler = None
        self._cache: OrderedDict[tuple, Any] = OrderedDict()  # the CACHED_GRAMMARS used last
        self._lock = threading.Lock()

    def _xgr(self):
        import xgrammar as xgr

        if self._compiler is None:  # built on first use: it scans the whole vocabulary
            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size,
                                                      stop_token_ids=self._stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        return xgr

    def matcher(self, guided: GuidedDecoding):
        """A new GrammarMatcher for one request; an uncompilable constraint raises GrammarCompileError (an
        InvalidRequestError)."""
        with self._lock:
            xgr = self._xgr()
            key = guided.key()
            if key in self._cache:
                self._cache.move_to_end(key)
            else:
                self._cache[key] = self._compile(guided)
                if len(self._cache) > CACHED_GRAMMARS:
                    self._cache.popitem(last=False)
            return xgr.GrammarMatcher(self._cache[key])

    def _compile(self, guided: GuidedDecoding):
        c = self._compiler
        try:
            if guided.json_schema is not None:
                schema = guided.json_schema if isinstance(guided.json_schema, str) else json.dumps(guided.json_schema)
                return c.compile_json_schema(schema, any_whitespace=False, strict_mode=False)
            if guided.json_object:  # an object, not any JSON value; no free whitespace for a weak model to ramble in
                return c.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if guided.grammar is not None:
                return c.compile_grammar(guided.grammar)
            if guided.structural_tag is not None:
                tag = guided.structural_tag
                tag = json.loads(tag) if isinstance(tag, str) else tag
                return c.compile_structural_tag(json.dumps(_without_free_whitespace(tag, self._xgr())))
            return c.compile_regex(guided.regex)
        except Exception as e:  # xgrammar raises RuntimeError/ValueError with its parser's message
            raise GrammarCompileError(f"the guided-decoding constraint cannot be compiled to a grammar: {e}") from e


def _without_free_whitespace(node: Any, xgr: Any) -> Any:
    """A structural tag whose JSON-schema parts allow no whitespace beyond json.dumps' own, as the engine's
    json_schema constraints do (xgrammar's structural-tag JSON takes at least one free whitespace character
    between tokens, which a weak model fills until max_tokens); a part that sets max_whitespace_cnt is kept."""
    if isinstance(node, list):
        return [_without_free_whitespace(v, xgr) for v in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "json_schema" and node.get("style", "json") == "json" and "max_whitespace_cnt" not in node:
        grammar = xgr.Grammar.from_json_schema(json.dumps(node["json_schema"]), any_whitespace=False,
                                               strict_mode=False)
        return {"type": "grammar", "grammar": str(grammar)}
    return {k: _without_free_whitespace(v, xgr) for k, v in node.items()}


def apply_token_masks(logits: torch.Tensor, matchers: list) -> None:
    """Sets the logits of tokens each row's grammar forbids to -inf, in place. logits: [B, vocab]; matchers[i] is
    the i-th row's GrammarMatcher or None (unconstrained)."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(matchers), logits.shape[-1])
    for i in rows:
        matchers[i].fill_next_token_bitmask(bitmask, i)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)
