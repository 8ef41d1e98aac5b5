"""LangChain integration for Braid: `ChatBraid`, a chat model on the local engine that reuses shared context.

    from braid_langchain import ChatBraid
    ChatBraid(temperature=0).invoke("Hello")
"""
from braid_langchain.chat_models import EMBEDDED_MODEL_NAME, ChatBraid
from braid_langchain.documents import render_documents

__all__ = ["EMBEDDED_MODEL_NAME", "ChatBraid", "render_documents"]
