"""Mistral from GGUF: llama.cpp exports it as `llama` (q/k rows permuted) with `llama.attention.sliding_window`, which
makes the file load as a windowed MistralForCausalLM; without the key it stays Llama."""
from __future__ import annotations

import os

import pytest
import torch

from braidinfer.loader import resolve_model
from braidinfer.models.config import ModelConfig
from braidinfer.models.registry import model_class
from tests.support.gguf_export import write_gguf

WINDOW = 8
SHAPE = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    import transformers

    torch.manual_seed(7)
    return transformers.MistralForCausalLM(transformers.MistralConfig(**SHAPE, sliding_window=WINDOW)).eval()


@pytest.fixture(scope="module")
def mistral_gguf(tmp_path_factory, mistral):
    path = tmp_path_factory.mktemp("gguf-mistral") / "tiny-mistral.F32.gguf"
    write_gguf(mistral, path, "llama", permute_qk=True, extra=lambda w: w.add_sliding_window(WINDOW))
    return str(path)


def _weights(path: str) -> dict[str, torch.Tensor]:
    return dict(resolve_model(path).iter_weights(torch.float32, progress=False))


def _assert_same(ours: dict, ref: dict) -> None:
    assert set(ours) == set(ref)
    for name, tensor in ref.items():
        assert torch.equal(ours[name], tensor.float()), name


def test_weights_unpermuted_as_written(mistral_gguf, mistral):
    _assert_same(_weights(mistral_gguf), mistral.state_dict())


def test_weights_match_transformers_import(mistral_gguf):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(mistral_gguf), gguf_file=os.path.basename(mistral_gguf))
    _assert_same(_weights(mistral_gguf), hf.state_dict())


def test_sliding_window_makes_it_windowed_mistral(mistral_gguf):
    config = resolve_model(mistral_gguf).hf_config
    assert config["architectures"] == ["MistralForCausalLM"] and config["model_type"] == "mistral"
    assert (config["sliding_window"], config["head_dim"]) == (WINDOW, 32)
    cfg = ModelConfig.from_hf_config(config)
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    assert [spec.sliding_window for spec in model.attention_specs()] == [WINDOW, WINDOW]


def test_without_window_it_stays_llama(tmp_path, mistral):
    path = tmp_path / "tiny-llama.F32.gguf"
    write_gguf(mistral, path, "llama", permute_qk=True)
    config = resolve_model(str(path)).hf_config
    assert config["architectures"] == ["LlamaForCausalLM"] and "sliding_window" not in config
