"""An engine with freeze_gc keeps the heap it was loaded with frozen while it serves, and gives it back on close: cycles
that became garbage meanwhile are collected then, and a freeze stays while another engine still holds one."""
from __future__ import annotations

import gc
import weakref

import pytest

from braidinfer import LLM, SamplingParams


class Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the cyclic collector frees it


def _llm(path: str, **kw) -> LLM:
    return LLM(model=path, device="cpu", dtype="float32", progress=False, **kw)


@pytest.fixture
def model_path(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(autouse=True)
def nothing_frozen_around():
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_the_loaded_heap_is_frozen_until_close_and_its_garbage_collected_then(model_path):
    node = Node()
    probe = weakref.ref(node)
    llm = _llm(model_path, freeze_gc=True)
    assert llm.engine.froze_heap and gc.get_freeze_count() > 0
    del node
    gc.collect()
    assert probe() is not None  # frozen: a full collection does not look at it
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))[0].token_ids  # serving is unaffected
    llm.close()
    assert gc.get_freeze_count() == 0
    assert probe() is None  # the close's own collection freed it


def test_a_freeze_stays_while_another_engine_holds_one(model_path):
    first, second = _llm(model_path, freeze_gc=True), _llm(model_path, freeze_gc=True)
    node = Node()
    probe = weakref.ref(node)
    first.close()  # refreezes everything alive, the node included (the second engine still holds a freeze)
    assert gc.get_freeze_count() > 0
    del node
    gc.collect()
    assert probe() is not None
    second.close()
    assert gc.get_freeze_count() == 0 and probe() is None


def test_off_by_default(model_path):
    with _llm(model_path) as llm:
        assert not llm.engine.froze_heap and gc.get_freeze_count() == 0
