"""LangChain's standard unit suite: construction, bind_tools, with_structured_output, tracing params (no engine)."""
from __future__ import annotations

from langchain_tests.unit_tests import ChatModelUnitTests

from tests.langchain.conftest import GREEDY, ChatBraidCapabilities


class TestChatBraidUnit(ChatBraidCapabilities, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict:
        return GREEDY

    @property
    def standard_chat_model_params(self) -> dict:
        # Braid runs in-process: there is no API key, network timeout or retry to configure, and ChatBraid
        # rejects unknown parameters rather than ignoring them.
        params = super().standard_chat_model_params
        return {k: v for k, v in params.items() if k not in ("api_key", "timeout", "max_retries")}
