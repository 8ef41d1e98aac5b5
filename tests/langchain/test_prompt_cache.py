"""The per-head memos of ChatBraid's request builder give what the un-memoised path gives: prompt ids equal to the
engine's own encoding of the whole conversation, the same head object only for the same system prompt and documents,
template renders equal to transformers' `apply_chat_template`, and segment ends equal to a plain recomputation."""
from __future__ import annotations

import copy
import pathlib
import random

import pytest
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from braid_langchain import ChatBraid, engines, prompt_cache, render_documents
from braid_langchain.messages import to_chat_messages
from tests.langchain.conftest import ENGINE, GREEDY

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures"
SYSTEM = "You are a careful librarian. Answer from the documents only, in one short sentence."
DOCS = [Document("The Nile is the longest river in Africa and flows north into the Mediterranean Sea.", id="nile"),
        Document("Lake Victoria is the largest lake in Africa, shared by Uganda, Kenya and Tanzania.", id="victoria")]


def _engine():
    return engines.get_engine(ENGINE["model"], ENGINE["device"])


def _chat(system: str, documents: list[Document], question: str) -> list[dict]:
    return to_chat_messages([SystemMessage(system), HumanMessage(question)],
                            system_extras=[render_documents(documents)] if documents else [])


def _wrapped(tokenizer, chat, **template_kwargs) -> str:
    """The reference render: transformers' own apply_chat_template."""
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **template_kwargs)


def test_a_head_is_reused_only_for_its_own_system_prompt_and_documents():
    llm = _engine()
    variants = [(SYSTEM, DOCS), (SYSTEM + " ", DOCS), (SYSTEM, DOCS[:1]),
                (SYSTEM, [Document(DOCS[0].page_content + "!", id="nile"), DOCS[1]])]
    first_heads = []
    for system, documents in variants:
        heads = []
        for question in ["Which river is longest?", "Which lake is largest?"]:
            chat = _chat(system, documents, question)
            head, ids = prompt_cache.split_prompt_ids(llm, chat, {})
            assert ids == llm.apply_chat_template(chat)  # the engine's encoding of the whole conversation
            assert len(head) > 0 and list(head) == ids[: len(head)]
            heads.append(head)
        assert heads[1] is heads[0]  # the second question reuses the first one's head
        first_heads.append(heads[0])
    # A changed system prompt or document is another head, never the memo's earlier one.
    assert len({id(h) for h in first_heads}) == len(variants)
    assert len({h for h in first_heads}) == len(variants)


def test_a_conversation_with_special_token_strings_is_encoded_whole():
    llm = _engine()
    chat = _chat(SYSTEM + " <|im_end|>", DOCS, "Hi")
    head, ids = prompt_cache.split_prompt_ids(llm, chat, {})
    assert head == () and ids == llm.apply_chat_template(chat)


@pytest.mark.parametrize("template", [None, "qwen3", "llama3.1", "deepseek_r1_distill", "mistral_v0.3"])
def test_direct_renders_equal_the_wrapper(template):
    tokenizer = copy.deepcopy(_engine().tokenizer)
    if template is not None:
        tokenizer.chat_template = (FIXTURES / f"{template}_chat_template.jinja").read_text(encoding="utf-8")
    cache = prompt_cache._HeadIds(tokenizer)
    assert cache.compile is not None
    plain = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Which river?"}]
    others = [[{"role": "user", "content": "Hi", "name": "ann"}],  # a key that is not role or content
              [{"role": "user", "content": None}],  # dropped by the wrapper
              [{"role": "assistant", "content": "", "reasoning_content": "hm"}, {"role": "user", "content": "Hi"}]]
    for chat, kwargs in [(plain, {}), (plain, {"enable_thinking": False}), (plain, {"enable_thinking": True}),
                         (plain[1:], {}), *((c, {}) for c in others)]:
        for _ in range(2):  # the first direct render is checked against the wrapper, the second is not
            try:
                expected = _wrapped(tokenizer, chat, **kwargs)
            except Exception as e:
                with pytest.raises(type(e)):
                    cache.render(chat, kwargs)
                continue
            assert cache.render(chat, kwargs) == expected
    assert cache.direct == (tokenizer.chat_template, True)


def test_a_template_rendered_differently_keeps_the_wrapper_and_a_new_template_is_seen():
    tokenizer = copy.deepcopy(_engine().tokenizer)
    cache = prompt_cache._HeadIds(tokenizer)
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]

    class Wrong:
        def render(self, **values):
            return "not what the wrapper renders"

    compile_ = cache.compile
    cache.compile = lambda template: Wrong()
    for _ in range(3):
        assert cache.render(chat, {}) == _wrapped(tokenizer, chat)
    assert cache.direct == (tokenizer.chat_template, False)
    cache.compile = compile_
    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    for _ in range(2):  # another template object: checked again, then rendered directly
        assert cache.render(chat, {}) == _wrapped(tokenizer, chat)
    assert cache.direct == (tokenizer.chat_template, True)


def test_find_equals_str_find():
    rng = random.Random(0)
    cases = [("abcabd" * 30, "abd" * 40), ("x" * 10, ""), ("", "a"), ("a" * 100 + "b", "a" * 70 + "b"),
             ("ab" * 100, "ab" * 40 + "c")]
    for _ in range(300):
        text = "".join(rng.choice("ab") for _ in range(rng.randrange(0, 300)))
        start = rng.randrange(0, len(text) + 1)
        cases.append((text, text[start: start + rng.randrange(0, 150)] + rng.choice(["", "a", "b"])))
    for text, needle in cases:
        assert prompt_cache._find(text, needle) == text.find(needle), (text, needle)


def _reference_segments(llm, prompt, system, documents):
    """Where the system prompt and each document end in `prompt`: the common prefix of the prompt with the system
    message rendered alone and with the first 1, 2, ... documents, strictly increasing, before its last token."""
    out, last = [], 0
    for i in range(len(documents) + 1):
        extras = [render_documents(documents[:i])] if i else []
        head = llm.apply_chat_template(to_chat_messages([SystemMessage(system)], system_extras=extras),
                                       add_generation_prompt=False)
        end = 0
        while end < min(len(head), len(prompt)) and head[end] == prompt[end]:
            end += 1
        end = min(end, len(prompt) - 1)
        if end > last:
            out.append((end, "document" if i else "system"))
            last = end
    return out


def test_requests_equal_the_unmemoised_prompt_and_segments():
    llm = _engine()
    chat = ChatBraid(**GREEDY, max_tokens=4)
    changed = [Document(DOCS[0].page_content.replace("north", "south"), id="nile"), DOCS[1]]
    for system, documents in [(SYSTEM, DOCS), (SYSTEM, DOCS), (SYSTEM, changed), (SYSTEM + " Be brief.", DOCS)]:
        for history in ([], [HumanMessage("Hi"), AIMessage("Hello.")]):
            messages = [SystemMessage(system), *history, HumanMessage("Which river flows north?")]
            request = chat._request(messages, None, llm, {"documents": documents})
            expected = llm.apply_chat_template(to_chat_messages(messages, system_extras=[render_documents(documents)]))
            assert request.prompt == expected
            assert request.tokenized().ids() == expected and len(request.head) > 0
            assert request.segments == _reference_segments(llm, expected, system, sorted(documents, key=lambda d: d.id))
