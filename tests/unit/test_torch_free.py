"""The bookkeeping modules import without torch: a fresh interpreter whose import of torch fails loads each one."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TORCH_FREE = ["braidinfer.attention.metadata", "braidinfer.attention.cascade_plan", "braidinfer.graph_buckets",
              "braidinfer.step_plan", "braidinfer.config", "braidinfer.attention.spec", "braidinfer.channels",
              "braidinfer.tokenized_prompt"]

BLOCK_TORCH = """
import importlib.abc, sys

class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} imported")

sys.meta_path.insert(0, BlockTorch())
"""


def _import_without_torch(module: str) -> subprocess.CompletedProcess:
    code = BLOCK_TORCH + f"import {module}\nassert 'torch' not in sys.modules\n"
    root = Path(__file__).resolve().parents[2]  # this checkout, ahead of any installed copy
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_without_torch(module):
    result = _import_without_torch(module)
    assert result.returncode == 0, result.stderr


def test_the_check_fails_for_a_module_that_needs_torch():
    result = _import_without_torch("braidinfer.attention.torch_backend")
    assert result.returncode != 0 and "torch imported" in result.stderr
