"""CheckedHeads: a head tuple is checked once and then remembered by identity (held, bounded, least recently used
forgotten first); an invalid head or a mutable one is never remembered. Torch-free."""
from __future__ import annotations

import pytest

from braidinfer.tokenized_prompt import CheckedHeads, TokenizedPrompt

VOCAB = 100


def _valid(ids) -> bool:
    """The reference: every id a plain int (not a bool) in [0, VOCAB)."""
    return all(type(t) is int and 0 <= t < VOCAB for t in ids)


@pytest.mark.parametrize("head", [(0, 1, 99), (5,), (0, 100), (-1, 3), (1, 2.0), (1, True), (1, "2")])
def test_valid_matches_the_reference(head):
    heads = CheckedHeads(VOCAB)
    assert heads.valid(head) is _valid(head)
    assert heads.valid(head) is _valid(head)  # the second answer is the same, remembered or not
    assert len(heads) == (1 if _valid(head) else 0)  # an invalid head is never remembered


def test_a_remembered_head_is_not_walked_again_and_an_equal_new_tuple_is():
    heads = CheckedHeads(VOCAB)
    walks = []

    class Walked(tuple):
        def __iter__(self):
            walks.append(1)
            return super().__iter__()

    head = Walked((1, 2, 3))
    assert heads.valid(head) and heads.valid(head)
    assert len(walks) == 2  # a tuple subclass may override anything: checked every time, never remembered
    assert len(heads) == 0
    plain = (1, 2, 3)
    assert heads.valid(plain) and len(heads) == 1
    assert heads.valid(tuple([1, 2, 3])) and len(heads) == 2  # equal but another object: checked and kept too


def test_lists_are_checked_every_time():
    heads = CheckedHeads(VOCAB)
    ids = [1, 2, 3]
    assert heads.valid(ids) and len(heads) == 0
    ids.append(VOCAB)  # a list may change after a check
    assert not heads.valid(ids)


def test_bounded_least_recently_used_first():
    heads = CheckedHeads(VOCAB, max_heads=2)
    a, b, c = (1,), (2,), (3,)
    for head in (a, b, a, c):  # a used again after b: b is the oldest when c arrives
        assert heads.valid(head)
    assert len(heads) == 2
    assert heads._heads.get(id(a)) is a and heads._heads.get(id(c)) is c and id(b) not in heads._heads


def test_tokenized_prompt_is_its_head_then_its_ids():
    head = (1, 2)
    prompt = TokenizedPrompt([3, 4], tokenizer=None, head=head)
    assert len(prompt) == 4 and prompt.ids() == [1, 2, 3, 4]
    assert prompt.ids() is not prompt.token_ids
    assert TokenizedPrompt([5], tokenizer=None).ids() == [5]
