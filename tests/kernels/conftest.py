"""Kernel tests run on CUDA when there is a GPU, otherwise on the CPU through Triton's interpreter.

Triton reads TRITON_INTERPRET when @triton.jit decorates a function (triton.knobs.runtime.interpret, looked up at
each decoration), that is when `kernels` is first imported; this conftest is imported before the test modules of
this folder, so setting it here takes effect. test_numerics.py checks that it did.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def device() -> str:
    """Where the small-shape tests run: CUDA when present, else the CPU (interpreted)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
