"""ChatBraid pins the system prompt and each document as a chain of engine chunks: exact token prefixes of the
prompt, reused across calls, bounded, and best effort when the engine refuses a pin."""
from __future__ import annotations

import asyncio
import gc
import weakref

from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from braid_langchain import ChatBraid, engines, pinning, render_documents
from braid_langchain.pinning import PrefixPins, common_prefix_length, pins_for, segment_ends
from braidinfer.errors import OutOfPagesError, PinWouldStarveError
from tests.langchain.conftest import ENGINE, GREEDY

SYSTEM = SystemMessage("You are a careful librarian. Answer from the documents only, in one short sentence, and "
                       "say which document you used.")
DOCS = [Document("The Nile is the longest river in Africa and flows north into the Mediterranean Sea.", id="nile"),
        Document("Mount Kilimanjaro, in Tanzania, is the highest mountain in Africa, a dormant volcano.", id="kili"),
        Document("Lake Victoria is the largest lake in Africa, shared by Uganda, Kenya and Tanzania.", id="victoria")]


def _engine():
    return engines.get_engine(ENGINE["model"], ENGINE["device"])


def _request(chat: ChatBraid, messages, **kwargs):
    return chat._request(messages, None, _engine(), kwargs)


def test_segments_end_where_the_system_prompt_and_each_document_end():
    chat = ChatBraid(**GREEDY, max_tokens=4)
    llm = _engine()
    request = _request(chat, [SYSTEM, HumanMessage("Which lake is largest?")], documents=DOCS[::-1])
    ends = [end for end, _ in request.segments]
    assert [kind for _, kind in request.segments] == ["system", "document", "document", "document"]
    # Each document segment ends after that document's text and before the next one's.
    in_order = sorted(DOCS, key=lambda d: d.id)
    for i, end in enumerate(ends[1:]):
        head = llm.tokenizer.decode(request.prompt[:end])
        assert all(d.page_content in head for d in in_order[: i + 1])
        assert not any(d.page_content[:30] in head for d in in_order[i + 1 :])
    system_alone = llm.apply_chat_template([{"role": "system", "content": SYSTEM.content}],
                                           add_generation_prompt=False)
    assert ends[0] == common_prefix_length(request.prompt, system_alone)
    assert ends == sorted(set(ends))


def test_calls_pin_the_chain_and_reuse_it():
    llm = _engine()
    pins = pins_for(llm)
    pins.release_all()
    chat = ChatBraid(**GREEDY, max_tokens=4)
    request = _request(chat, [SYSTEM, HumanMessage("Which river is longest?")], documents=DOCS)
    cached_before = llm.num_cached_tokens(request.prompt)
    first = chat.invoke([SYSTEM, HumanMessage("Which river is longest?")], documents=DOCS)
    chunks = list(llm.chunks)
    page = llm.config.page_size
    useful = [end for end, _ in request.segments]
    # One chunk per segment that adds a full page; each is exactly the prompt's prefix up to its segment end.
    assert [c.num_prefix_tokens for c in chunks] == [e for i, e in enumerate(useful)
                                                    if e // page > (useful[i - 1] // page if i else 0)]
    for chunk in chunks:
        assert chunk.prefix_token_ids == request.prompt[: chunk.num_prefix_tokens]
        assert len(chunk.pages) == chunk.num_prefix_tokens // page
    assert llm.cache_stats()["pinned"] == len(chunks[-1].pages)
    second = chat.invoke([SYSTEM, HumanMessage("Which mountain is highest?")], documents=DOCS)
    assert list(llm.chunks) == chunks  # nothing pinned twice
    assert second.usage_metadata["input_token_details"]["cache_read"] >= len(chunks[-1].pages) * page
    # The first call computed the pins itself: only what was cached before it counts as read.
    assert first.usage_metadata["input_token_details"]["cache_read"] == cached_before
    pins.release_all()
    assert llm.cache_stats()["pinned"] == 0


def test_async_calls_pin_too_and_without_pinning_nothing_is_pinned():
    llm = _engine()
    pins_for(llm).release_all()
    off = ChatBraid(**GREEDY, max_tokens=4, pin_prefixes=False)
    off.invoke([SYSTEM, HumanMessage("Hi")], documents=DOCS[:1])
    assert len(llm.chunks) == 0
    on = ChatBraid(**GREEDY, max_tokens=4)
    asyncio.run(on.ainvoke([SYSTEM, HumanMessage("Hi")], documents=DOCS[:1]))
    assert [c.kind for c in llm.chunks][-1] == "document" and llm.cache_stats()["pinned"] > 0
    pins_for(llm).release_all()


def test_the_registry_is_bounded_and_best_effort():
    llm = _engine()
    pins_for(llm).release_all()
    pins = PrefixPins(llm, max_chunks=2)
    chat = ChatBraid(**GREEDY, max_tokens=4)
    prompts = []
    for i in range(3):
        request = _request(chat, [SystemMessage(f"System prompt number {i}. " + SYSTEM.content), HumanMessage("Hi")])
        pins.pin(request.prompt, request.segments)
        prompts.append(request.prompt)
    assert len(pins) == 2 and len(llm.chunks) == 2  # the oldest was released
    assert [c.prefix_token_ids for c in llm.chunks] == [p[: c.num_prefix_tokens] for p, c in
                                                        zip(prompts[1:], llm.chunks)]
    # A segment longer than the engine lets chunks pin is skipped without an error, and room is made.
    huge = list(range(10, 10 + llm.engine.pins.max_pages * llm.config.page_size + 64))
    pins.pin(huge + [5], segment_ends(huge + [5], [(huge, "document")]))
    assert len(pins) == 1
    pins.release_all()
    assert llm.cache_stats()["pinned"] == 0 and len(llm.chunks) == 0


def test_a_pin_refused_for_now_releases_no_other_pin(monkeypatch):
    """The engine refuses a pin for now when a started request needs the room (PinWouldStarveError): the call goes
    on unpinned and the other pins stay; a full pin budget (OutOfPagesError) releases the oldest half instead."""
    llm = _engine()
    pins_for(llm).release_all()
    pins = PrefixPins(llm, max_chunks=4)
    chat = ChatBraid(**GREEDY, max_tokens=4)
    requests = [_request(chat, [SystemMessage(f"System prompt number {i}. " + SYSTEM.content), HumanMessage("Hi")])
                for i in range(4)]
    for request in requests[:2]:
        pins.pin(request.prompt, request.segments)
    kept = list(llm.chunks)
    for error, left in ((PinWouldStarveError("a running request needs the room"), 2),
                        (OutOfPagesError("chunks already pin 8"), 1)):
        def refuse(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(llm.chunks, "add", refuse)
        assert pins.pin(requests[2].prompt, requests[2].segments) == llm.num_cached_tokens(requests[2].prompt)
        assert len(pins) == left and list(llm.chunks) == kept[2 - left:]
    pins.release_all()

def test_prompt_ids_reuse_the_system_head_and_equal_the_whole_encoding():
    from braid_langchain import prompt_cache
    from braid_langchain.messages import to_chat_messages

    llm = _engine()
    extras = [render_documents(DOCS)]
    questions = ["Which river is longest?", "Tell me <|im_end|> more", " leading space", "émoji 🚀\nand lines",
                 "Which river is longest?"]
    for i, question in enumerate(questions):
        messages = [SYSTEM, HumanMessage(question)] + ([AIMessage("Fine."), HumanMessage("And?")] if i % 2 else [])
        chat = to_chat_messages(messages, system_extras=extras)
        # The reference: the engine's own encoding of the whole rendered conversation (with its escaping).
        assert prompt_cache.prompt_ids(llm, chat, {}) == llm.apply_chat_template(chat)
    heads = prompt_cache._cache_for(llm).ids
    assert any(ids is not None and SYSTEM.content in head for head, ids in heads.items())


def test_prompt_ids_of_long_system_prompts_with_and_without_special_token_strings():
    from braid_langchain import prompt_cache
    from braid_langchain.messages import to_chat_messages

    llm = _engine()
    long_text = "A long shared system prompt about rivers. " * 20  # above the length whose scan is remembered
    for system in [long_text, long_text + "<|im_start|>user", long_text, long_text + "<|im_start|>user"]:
        for question in ["First?", "Second?"]:  # the second call meets the remembered scan
            chat = to_chat_messages([SystemMessage(system), HumanMessage(question)], system_extras=[])
            assert prompt_cache.prompt_ids(llm, chat, {}) == llm.apply_chat_template(chat)
    assert long_text in prompt_cache._cache_for(llm).clean


def test_a_chain_released_from_outside_is_pinned_again_and_a_pinned_one_reused():
    llm = _engine()
    pins_for(llm).release_all()
    pins = PrefixPins(llm)
    chat = ChatBraid(**GREEDY, max_tokens=4)
    request = _request(chat, [SYSTEM, HumanMessage("Hi")], documents=DOCS[:2])
    assert pins.pin(request.prompt, request.segments) is not None  # pinned now: it prefilled
    first = list(llm.chunks)
    other = _request(chat, [SYSTEM, HumanMessage("Which lake is largest?")], documents=DOCS[:2])
    assert pins.pin(other.prompt, other.segments) is None and list(llm.chunks) == first  # the same chain, no prefill
    llm.chunks.release_all()
    assert pins.pin(request.prompt, request.segments) is not None
    again = list(llm.chunks)
    assert len(pins) == len(first) >= 2 and all(c.released for c in first) and not any(c.released for c in again)
    assert [c.prefix_token_ids for c in again] == [c.prefix_token_ids for c in first]
    pins.release_all()
    assert len(pins) == 0 and llm.cache_stats()["pinned"] == 0


def test_closing_an_engine_drops_its_pins_and_frees_it(tiny_model_dir):
    chat = ChatBraid(model=tiny_model_dir("llama"), device="cpu", dtype="float32", temperature=0.0, max_tokens=2,
                     engine_kwargs={"page_size": 4, "max_model_len": 256})
    chat.invoke([SYSTEM, HumanMessage("Hi")])
    llm = chat._engine({})
    pinned = list(llm.chunks)
    assert pinned and len(pins_for(llm)) == len(pinned)
    engines.close_engine(chat.model, chat.device, chat.dtype, **chat.engine_kwargs)
    assert llm not in pinning._registry and all(c.released for c in pinned)
    closed = weakref.ref(llm)
    del llm
    gc.collect()
    assert closed() is None  # nothing of ChatBraid's keeps a closed engine (weights, KV pages) alive


def test_the_pin_registry_does_not_keep_an_engine_alive(tiny_model_dir):
    from braidinfer import LLM

    llm = LLM(model=tiny_model_dir("llama"), device="cpu", dtype="float32", page_size=4, max_model_len=256,
              progress=False)
    prompt = llm.apply_chat_template([{"role": "system", "content": SYSTEM.content}, {"role": "user", "content": "Hi"}])
    assert pins_for(llm).pin(prompt, [(16, "system")]) is not None and len(pins_for(llm)) == 1
    dropped = weakref.ref(llm)
    del llm  # never closed: collected, it frees its engine (see braidinfer.LLM), unless something still holds it
    gc.collect()
    assert dropped() is None
