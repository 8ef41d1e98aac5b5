"""A Qwen3-style tokenizer built offline: a small byte-level BPE trained on stdlib text, wrapped as transformers'
Qwen2Tokenizer (Qwen3's tokenizer class) with Qwen3's added tokens, eos/pad tokens and real chat template."""
from __future__ import annotations

import importlib
import json
import pathlib

TEMPLATE_FILE = pathlib.Path(__file__).parent / "fixtures" / "qwen3_chat_template.jinja"

# Qwen3's added tokens in its id order; the first three are special (skipped when decoding), the rest are text.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TEXT_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")


def _corpus() -> list[str]:
    """English and code text that ships with Python, plus the template (so its markup gets merges of its own)."""
    modules = ("argparse", "collections", "difflib", "json", "pickle", "re", "string", "subprocess")
    docs = [importlib.import_module(m).__doc__ or "" for m in modules]
    return [TEMPLATE_FILE.read_text(encoding="utf-8"), *docs]


def build_qwen3_tokenizer(vocab_size: int = 1024):
    """A Qwen2Tokenizer whose BPE (`vocab_size` entries before the added tokens) is trained here with Qwen2/3's
    pre-tokenizer; eos `<|im_end|>`, pad `<|endoftext|>`, no bos, and Qwen3's chat template."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    # Train with the exact pipeline Qwen2Tokenizer rebuilds from vocab and merges, so the merges fit it.
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = Qwen2Tokenizer().backend_tokenizer.pre_tokenizer
    bpe.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    vocab = bpe.get_vocab()
    # As in Qwen3, the added tokens take the ids after the BPE vocabulary, in this order.
    vocab.update({t: i for i, t in enumerate(SPECIAL_TOKENS + TEXT_TOKENS, start=len(vocab))})
    merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         unk_token=None, additional_special_tokens=list(SPECIAL_TOKENS[1:]),
                         chat_template=TEMPLATE_FILE.read_text(encoding="utf-8"))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TEXT_TOKENS])
    return tok
