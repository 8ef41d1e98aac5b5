"""Shared settings for the LangChain tests: every module talks to the same embedded engine (loaded once per
process by braid_langchain.engines), greedy and with short replies to keep CPU runtime low."""
from __future__ import annotations

import inspect

import pytest

ENGINE = {"model": None, "device": "cpu"}
GREEDY = {**ENGINE, "temperature": 0.0}


class ChatBraidCapabilities:
    """What ChatBraid declares to LangChain's standard suites (shared by the unit and integration classes)."""

    @property
    def chat_model_class(self):
        from braid_langchain import ChatBraid

        return ChatBraid

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True


@pytest.fixture(scope="module")
def chat():
    """A greedy ChatBraid on the embedded model, one per test module."""
    from braid_langchain import ChatBraid

    return ChatBraid(**GREEDY, max_tokens=32)


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_pycollect_makeitem(collector, name, obj):
    # LangChain's standard suites define unmarked `async def` tests. Marking them here, inside pytest-asyncio's
    # own collection wrapper, runs them without switching the asyncio mode of the other test directories.
    outcome = yield
    items = outcome.get_result()
    for item in items if isinstance(items, list) else [items] if items is not None else []:
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
            item.add_marker(pytest.mark.asyncio)
