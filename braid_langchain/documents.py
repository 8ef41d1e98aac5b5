"""Retrieved documents -> text after the system prompt, one block per document, in a stable order. Pure.

The engine reuses the KV of any identical, already computed token prefix. Rendering every document the same
way, in an order that does not depend on retrieval scores, makes the system prompt and each leading document
a prefix that later questions share: two questions whose retrievals both start with document A (by the order
below) compute A once.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence

from langchain_core.documents import Document

DOCUMENTS_HEADER = "Use the following documents to answer."


def sort_documents(documents: Sequence[Document | str]) -> list[Document]:
    """Documents (or plain strings) in a stable order: by id (or metadata "source"), then content; duplicates (the
    same source and content, whatever other metadata) dropped. ValueError for a string, a Document or a mapping
    (one document, not a collection of them)."""
    if isinstance(documents, (str, Document, Mapping)) or not isinstance(documents, Iterable):
        raise ValueError(f"documents must be a list of Documents or strings, got {type(documents).__name__}")
    unique = {document_key(d): d for d in map(_as_document, documents)}
    return [unique[k] for k in sorted(unique)]


def _as_document(document: Document | str) -> Document:
    if isinstance(document, str):
        return Document(document)
    if not isinstance(document, Document):
        raise ValueError(f"documents must be Documents or strings, got a {type(document).__name__}")
    return document


def render_document(document: Document) -> str:
    """One document as a self-contained block; its text depends only on the document's source and content (see
    `document_key`), not on its position or other metadata."""
    source = document_source(document)
    attrs = f' source={json.dumps(source, ensure_ascii=False)}' if source else ""
    return f"<document{attrs}>\n{document.page_content}\n</document>"


def render_documents(documents: Sequence[Document | str], *, header: str = DOCUMENTS_HEADER) -> str:
    """The documents block ChatBraid appends to the system message (also usable in a prompt template)."""
    return render_sorted_documents(sort_documents(documents), header=header)


def render_sorted_documents(documents: Sequence[Document], *, header: str = DOCUMENTS_HEADER) -> str:
    """`render_documents` of documents already in `sort_documents` order (what it returns, or a prefix of it): the
    same text without sorting again (ChatBraid renders the block for every prefix of a call's documents)."""
    if not documents:
        return ""
    blocks = [render_document(d) for d in documents]
    return "\n".join([header, *blocks]) if header else "\n".join(blocks)


def document_source(document: Document) -> str:
    """The source a document is rendered with: its id, else its metadata "source" ("" for none)."""
    source = document.id or document.metadata.get("source")
    return "" if source is None else str(source)


def document_key(document: Document) -> tuple[str, str]:
    """What identifies a document's rendering and order: (source, content). Other metadata is left out, as the
    rendering leaves it out: the same passage returned by two retrievers, each with its own score, is one document."""
    return document_source(document), document.page_content
