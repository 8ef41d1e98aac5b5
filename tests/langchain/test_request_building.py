"""Per-call shortcuts of ChatBraid's request building give what the long way gives: sampling parameters built once
per distinct settings, and the documents block rendered without sorting again."""
from __future__ import annotations

import pytest
from langchain_core.documents import Document

from braid_langchain import ChatBraid
from braid_langchain.documents import render_documents, render_sorted_documents, sort_documents
from braidinfer import SamplingParams
from braidinfer.errors import InvalidRequestError
from braidinfer.guided import GuidedDecoding


def _expected(chat, stop=None, **overrides):
    fields = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "seed", "repetition_penalty",
              "presence_penalty", "frequency_penalty")
    values = {f: overrides.get(f, getattr(chat, f)) for f in fields}
    return SamplingParams(**values, stop=stop if stop is not None else (chat.stop or []))


def test_equal_settings_share_one_sampling_params():
    chat = ChatBraid(temperature=0.3, max_tokens=7, stop=["END"])
    first = chat._sampling_params(None, None, {})
    assert first == _expected(chat)
    assert chat._sampling_params(None, None, {}) is first
    assert ChatBraid(temperature=0.3, max_tokens=7, stop=["END"])._sampling_params(None, None, {}) is first


@pytest.mark.parametrize("stop, overrides", [(None, {"temperature": 0.9}), (None, {"seed": 5}), (["x"], {}),
                                             ([], {}), (None, {"max_tokens": 3, "top_k": 4})])
def test_other_settings_get_their_own_sampling_params(stop, overrides):
    chat = ChatBraid(temperature=0.3, max_tokens=7, stop=["END"])
    params = chat._sampling_params(stop, None, overrides)
    assert params == _expected(chat, stop, **overrides)
    assert params != chat._sampling_params(None, None, {})


def test_a_changed_field_is_seen_by_the_next_call():
    chat = ChatBraid(temperature=0.3)
    chat._sampling_params(None, None, {})
    chat.temperature = 0.0
    assert chat._sampling_params(None, None, {}).temperature == 0.0


def test_guided_params_are_built_per_call_and_bad_values_still_raise():
    chat = ChatBraid()
    guided = GuidedDecoding(json_schema={"type": "object"})
    params = chat._sampling_params(None, guided, {})
    assert params.guided == guided and params == _expected(chat).model_copy(update={"guided": guided})
    with pytest.raises(InvalidRequestError, match="temperature"):
        chat._sampling_params(None, None, {"temperature": -1.0})
    with pytest.raises(InvalidRequestError):
        chat._sampling_params(None, None, {"max_tokens": 0})


DOCS = [Document("beans in the dry season", id="b"), "plain text", Document("rice in the wet season", id="a"),
        Document("rice in the wet season", id="a"), Document("no id", metadata={"source": "s.txt"})]


def test_sorted_rendering_equals_render_documents_for_every_prefix():
    docs = sort_documents(DOCS)
    assert render_sorted_documents(docs) == render_documents(DOCS) == render_documents(list(reversed(DOCS)))
    for i in range(len(docs) + 1):
        assert render_sorted_documents(docs[:i]) == render_documents(docs[:i])
        assert render_sorted_documents(docs[:i], header="") == render_documents(docs[:i], header="")


def test_a_document_is_rendered_once_whatever_its_other_metadata():
    # The same passage from two retrievers (EnsembleRetriever, MultiQueryRetriever), each with its own score.
    fr = [Document("Paris is the capital of France.", metadata={"source": "wiki/fr", "score": s}) for s in (0.9, 0.8)]
    other = Document("Paris is the capital of France.", metadata={"source": "wiki/paris", "score": 0.9})
    assert len(sort_documents([*fr, other])) == 2
    assert render_documents([*fr, other]) == render_documents([fr[1], other]) == "\n".join([
        "Use the following documents to answer.",
        '<document source="wiki/fr">\nParis is the capital of France.\n</document>',
        '<document source="wiki/paris">\nParis is the capital of France.\n</document>'])
