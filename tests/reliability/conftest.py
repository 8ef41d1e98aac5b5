"""Shared fixtures of the reliability tests: one embedded engine for the whole folder (the very engine ChatBraid's
registry hands out for model=None on the CPU), taken in each scheduling mode by the tests of the step, and a tiny
random Llama for tests that need an engine of their own (a small page pool, or one they kill)."""
from __future__ import annotations

import pytest

from tests.conftest import build_tiny_model


@pytest.fixture(scope="session")
def embedded_llm(embedded_gguf):
    """The shared embedded SmolLM2-135M-Instruct engine, as loaded (one step at a time on the CPU): ChatBraid(
    model=None, device="cpu") talks to it too."""
    from braid_langchain import engines

    return engines.get_engine(None, "cpu")


@pytest.fixture
def llm(embedded_llm, async_scheduling):
    """The shared embedded engine, scheduling its steps as `async_scheduling` says for the test's duration.

    Switched rather than built again: loading the embedded model takes ~15 s, and the engine reads its
    `async_scheduling` afresh at every step (nothing else depends on it), so switching it between steps gives what
    `LLM(async_scheduling=...)` builds. ChatBraid's registry keeps handing out this same engine."""
    engine = embedded_llm.engine
    default = engine.async_scheduling

    def switch(on: bool) -> None:
        engine.async_scheduling = on

    embedded_llm._loop.call(lambda: switch(async_scheduling))  # between steps, in the engine thread
    yield embedded_llm
    embedded_llm._loop.call(lambda: switch(default))


@pytest.fixture(scope="session")
def smollm_tokenizer(embedded_llm):
    """The embedded model's tokenizer, taken from the loaded engine (converting it from the GGUF again is slow)."""
    return embedded_llm.tokenizer


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm_tokenizer) -> str:
    """A directory holding a tiny random Llama with SmolLM2's tokenizer and chat template."""
    path = tmp_path_factory.mktemp("tiny-llama-reliability")
    build_tiny_model("llama", path, smollm_tokenizer, seed=11)
    return str(path)
