"""LangChain's standard unit suite: construction, bind_tools, with_structured_output, tracing params (no engine)."""
from __future__ import annotations

import pytest
from langchain_tests.unit_tests import ChatModelUnitTests

from tests.langchain.conftest import GREEDY, ChatBraidCapabilities


class TestChatBraidUnit(ChatBraidCapabilities, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict:
        return GREEDY

    @property
    def standard_chat_model_params(self) -> dict:
        # Braid runs in-process: there is no API key to configure (timeout and max_retries are ChatBraid fields).
        params = super().standard_chat_model_params
        return {k: v for k, v in params.items() if k != "api_key"}


SERDES_ALLOWLIST = (
    "the suite loads with allowed_objects='all', which langchain-core limits to the classes in its own "
    "serialization mapping; ChatBraid round-trips with allowed_objects=[ChatBraid, ...] "
    "(test_chat_braid_params.py::test_a_chain_holding_chat_braid_round_trips_through_dumps_and_loads)")


@pytest.fixture(autouse=True)
def _expected_failures(request):
    if request.node.name == "test_serdes":
        request.applymarker(pytest.mark.xfail(reason=SERDES_ALLOWLIST, raises=ValueError, strict=True))
