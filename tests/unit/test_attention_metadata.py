"""The one CSR layout of page tables (braidinfer.attention.metadata), without torch: against a token-by-token
reference (which page holds each KV token)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from braidinfer.attention.metadata import paged_kv_layout, paged_kv_tables


@st.composite
def requests(draw):
    """(page_size, page_tables, kv_lens): tables of distinct pages, each covering its KV, some with spare pages."""
    page_size = draw(st.sampled_from([1, 2, 3, 16]))
    kv_lens = draw(st.lists(st.integers(1, 5 * page_size + 3), max_size=10))
    next_page, tables = 0, []
    for n in kv_lens:
        num_pages = -(-n // page_size) + draw(st.integers(0, 2))
        tables.append(list(range(next_page, next_page + num_pages)))
        next_page += num_pages
    return page_size, tables, kv_lens


def _reference(page_tables, kv_lens, page_size):
    """Per request: the distinct pages that its tokens 0..kv_len-1 sit in, in order, and how many sit in the last."""
    indptr, indices, last = [0], [], []
    for table, kv_len in zip(page_tables, kv_lens):
        pages = [table[t // page_size] for t in range(kv_len)]
        used = list(dict.fromkeys(pages))
        indices += used
        indptr.append(len(indices))
        last.append(pages.count(used[-1]))
    return indptr, indices, last


@settings(max_examples=300, deadline=None)
@given(requests())
def test_csr_tables_list_the_pages_each_token_sits_in(case):
    page_size, tables, kv_lens = case
    got = paged_kv_tables(tables, kv_lens, page_size)
    assert (got.kv_indptr, got.kv_indices, got.kv_last_page_len) == _reference(tables, kv_lens, page_size)
    assert paged_kv_layout(kv_lens, page_size) == (got.kv_indptr, got.kv_last_page_len)


def test_by_hand():
    # page_size 4: 6 tokens in pages 7, 3 (page 9 spare); 1 token in page 2; 8 tokens fill pages 5 and 6.
    got = paged_kv_tables([[7, 3, 9], [2], [5, 6]], [6, 1, 8], page_size=4)
    assert got.kv_indptr == [0, 2, 3, 5]
    assert got.kv_indices == [7, 3, 2, 5, 6]
    assert got.kv_last_page_len == [2, 1, 4]
    assert paged_kv_layout([], 4) == ([0], [])


def test_mistakes_are_refused():
    with pytest.raises(ValueError, match="at least one token"):
        paged_kv_layout([3, 0], 4)
    with pytest.raises(ValueError, match="5 tokens in 1 pages of 4"):
        paged_kv_tables([[1]], [5], 4)
    with pytest.raises(ValueError, match="0 tokens"):
        paged_kv_tables([[1]], [0], 4)
    with pytest.raises(ValueError, match="2 page tables for 1"):
        paged_kv_tables([[1], [2]], [1], 4)
