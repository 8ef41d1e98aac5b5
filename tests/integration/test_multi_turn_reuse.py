"""Multi-turn chat re-prefills only what is new, and reuse stays exact when the chat template re-renders history
differently from what was generated (Qwen3 drops earlier turns' <think> blocks; templates add end-of-turn tokens)."""
from __future__ import annotations

import pytest
from qwen3_fixture import TEMPLATE_FILE
from transformers import AutoTokenizer

from braidinfer import LLM, SamplingParams

THOUGHT = "<think>\nThe user wants a short answer, so I will keep it brief.\n</think>\n\n"


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def expected_cached(prompt: list[int], finished: list[list[int]], page_size: int) -> int:
    """Prompt tokens the cache can serve, recomputed from token ids: the longest prefix shared with a finished
    sequence's computed tokens (prompt + output but the last output token, whose KV is never computed), short of the
    prompt's last token (always recomputed for its logits), floored to whole pages."""
    shared = max((common_prefix_len(prompt, seq[:-1]) for seq in finished), default=0)
    return min(shared, len(prompt) - 1) // page_size * page_size


# --- Qwen3: the template strips earlier turns' thinking ----------------------------------------------------------

QWEN3_PAGE = 4


@pytest.fixture
def qwen3_llms(qwen3_chat_model):
    kw = dict(device="cpu", dtype="float32", page_size=QWEN3_PAGE, cpu_kv_cache_bytes=1 << 24, progress=False)
    with LLM(model=qwen3_chat_model, **kw) as on, \
            LLM(model=qwen3_chat_model, enable_prefix_caching=False, **kw) as off:
        yield on, off


def test_qwen3_template_drops_thinking_of_earlier_turns(qwen3_llms):
    llm, _ = qwen3_llms
    tok = llm.tokenizer
    assert tok.chat_template == TEMPLATE_FILE.read_text(encoding="utf-8")
    for marker in ("<think>", "</think>", "<|im_end|>"):
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1
    turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": THOUGHT + "Hello!"}]
    rendered = tok.decode(llm.apply_chat_template(turn + [{"role": "user", "content": "Bye"}]))
    assert rendered == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
                        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    # The same turn keeps its thinking while it is the latest one, and reasoning_content is stripped like content.
    latest = tok.decode(llm.apply_chat_template(turn, add_generation_prompt=False))
    assert latest.endswith("<|im_start|>assistant\n" + THOUGHT + "Hello!<|im_end|>\n")
    split = [turn[0], {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."},
             {"role": "user", "content": "Bye"}]
    assert llm.apply_chat_template(split) == llm.apply_chat_template(turn + [split[-1]])
    no_think = tok.decode(llm.apply_chat_template(turn[:1], enable_thinking=False))
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def _qwen3_turns():
    """(user message, template kwargs, thinking forced after the generation prompt as if the model had produced it,
    the assistant message fed back built from the reply, whether the next prompt's text extends this prompt's)."""
    return [
        ("Hi! Name a colour.", {}, "", lambda r: {"content": THOUGHT + r}, True),
        ("Another one, briefly.", {"enable_thinking": False}, "", lambda r: {"content": r}, False),
        ("Why that one?", {}, THOUGHT, lambda r: {"content": THOUGHT + r}, False),
        ("And a fourth?", {}, "", lambda r: {"content": r, "reasoning_content": "Pick a new colour."}, True),
        ("Thanks, that is all.", {}, "", None, None),
    ]


def _qwen3_turn(llm: LLM, messages, kwargs, thought: str, params: SamplingParams):
    if not thought:
        return llm.chat(messages, params, **kwargs)
    ids = llm.apply_chat_template(messages, **kwargs) + llm.tokenizer(thought, add_special_tokens=False)["input_ids"]
    return llm.generate(ids, params)[0]


def test_qwen3_turns_reuse_exactly_the_think_stripped_history(qwen3_llms, qwen3_chat_model):
    on, off = qwen3_llms
    ref_tok = AutoTokenizer.from_pretrained(qwen3_chat_model)  # renders prompts independently of LLM.chat
    params = SamplingParams(temperature=0, max_tokens=12)
    messages, finished, prev_text, prev_keeps = [], [], None, None
    for user, kwargs, thought, feed_back, keeps in _qwen3_turns():
        messages.append({"role": "user", "content": user})
        text = ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs) + thought
        prompt = ref_tok(text, add_special_tokens=False)["input_ids"]
        if prev_text is not None:
            assert text.startswith(prev_text) == prev_keeps
        out = _qwen3_turn(on, messages, kwargs, thought, params)
        plain = off.generate(prompt, params)[0]
        assert out.prompt_token_ids == prompt
        assert out.token_ids == plain.token_ids
        assert plain.usage.cached_prompt_tokens == 0
        assert out.usage.cached_prompt_tokens == expected_cached(prompt, finished, QWEN3_PAGE)
        finished.append(prompt + out.token_ids)
        # Regenerating the reply finds the whole prompt cached; its last token is still recomputed.
        again = on.generate(prompt, params)[0]
        assert again.token_ids == out.token_ids
        assert again.usage.cached_prompt_tokens == expected_cached(prompt, finished, QWEN3_PAGE)
        if feed_back is not None:
            messages.append({"role": "assistant", **feed_back(out.text)})
        prev_text, prev_keeps = text, keeps


# --- SmolLM2: a ten-turn conversation re-prefills only the new turn ----------------------------------------------

SMOL_PAGE = 8
QUESTIONS = [
    "Name a fruit.", "What colour is it?", "Is it sweet?", "Where does it grow?", "Name another fruit.",
    "Which of the two is bigger?", "Give me a vegetable.", "How do you cook it?", "Say it in French.", "Thanks!",
]


def test_smollm2_conversation_prefills_only_the_new_turn(embedded_gguf):
    kw = dict(device="cpu", dtype="float32", page_size=SMOL_PAGE, cpu_kv_cache_bytes=1 << 27, progress=False)
    params = SamplingParams(temperature=0, max_tokens=12)
    rows, messages, finished, prev = [], [], [], ""
    with LLM(model=embedded_gguf, **kw) as on, LLM(model=embedded_gguf, enable_prefix_caching=False, **kw) as off:
        tok = on.tokenizer
        for question in QUESTIONS:
            messages.append({"role": "user", "content": question})
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            # What this turn adds to the conversation as generated: the end of the previous assistant turn (its
            # end-of-turn tokens), the new user message and the template around it.
            assert text.startswith(prev)
            num_new = len(tok(text[len(prev):], add_special_tokens=False)["input_ids"])
            out = on.chat(messages, params)
            plain = off.generate(out.prompt_token_ids, params)[0]
            assert out.token_ids == plain.token_ids
            assert plain.usage.cached_prompt_tokens == 0
            prompt = out.prompt_token_ids
            assert out.usage.cached_prompt_tokens == expected_cached(prompt, finished, SMOL_PAGE)
            prefilled = out.usage.prompt_tokens - out.usage.cached_prompt_tokens
            # Besides the new tokens, only the partial last page and the last generated token are recomputed.
            if finished:
                assert prefilled <= num_new + SMOL_PAGE
            rows.append((out.usage.prompt_tokens, out.usage.cached_prompt_tokens, prefilled,
                         plain.usage.prompt_tokens, num_new))
            finished.append(prompt + out.token_ids)
            messages.append({"role": "assistant", "content": out.text})
            prev = text + out.text
    print("\nturn  prompt  cached  prefilled(reuse)  prefilled(no reuse)  new turn tokens")
    for i, (n_prompt, n_cached, n_prefilled, n_plain, n_new) in enumerate(rows, 1):
        print(f"{i:4d}  {n_prompt:6d}  {n_cached:6d}  {n_prefilled:16d}  {n_plain:19d}  {n_new:15d}")
    print(f"total prefill: {sum(r[2] for r in rows)} tokens with reuse, {sum(r[3] for r in rows)} without")
