"""Qwen2 from GGUF (llama.cpp's `qwen2` architecture): q/k/v biases, no q/k permutation, against the state dict the
file was written from and transformers' own GGUF import."""
from __future__ import annotations

import os

import pytest
import torch

from braidinfer.loader import resolve_model
from braidinfer.models.config import ModelConfig
from braidinfer.models.qwen2 import Qwen2ForCausalLM
from tests.support.gguf_export import write_gguf

SHAPE = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def qwen2_gguf(tmp_path_factory):
    import transformers

    torch.manual_seed(6)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SHAPE)).eval()
    with torch.no_grad():  # transformers initialises biases to zero: random ones show a misplaced bias
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("gguf-qwen2") / "tiny-qwen2.F32.gguf"
    write_gguf(model, path, "qwen2")
    return str(path), model


def _weights(path: str) -> dict[str, torch.Tensor]:
    return dict(resolve_model(path).iter_weights(torch.float32, progress=False))


def _assert_same(ours: dict, ref: dict) -> None:
    assert set(ours) == set(ref)
    for name, tensor in ref.items():
        assert torch.equal(ours[name], tensor.float()), name


def test_weights_and_biases_as_written(qwen2_gguf):
    path, ref = qwen2_gguf
    ours = _weights(path)
    assert "model.layers.1.self_attn.k_proj.bias" in ours and "model.layers.1.self_attn.o_proj.bias" not in ours
    _assert_same(ours, ref.state_dict())


def test_weights_match_transformers_import(qwen2_gguf):
    from transformers import AutoModelForCausalLM

    path, _ = qwen2_gguf
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    _assert_same(_weights(path), hf.state_dict())


def test_config_builds_qwen2_with_plain_attention(qwen2_gguf):
    path, _ = qwen2_gguf
    config = resolve_model(path).hf_config
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    cfg = ModelConfig.from_hf_config(config)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    assert model.model.layers[0].self_attn.qkv_proj.bias is not None
    assert model.model.layers[0].self_attn.o_proj.bias is None  # attention_bias (true here) is not Qwen2's switch
    assert all(spec.sliding_window is None for spec in model.attention_specs())


def test_quantised_biases_load_dequantised(qwen2_gguf, tmp_path):
    """A file with Q8_0 biases (whole blocks; llama.cpp's converter keeps vectors float, other tools may not): the
    matrices stay blocks, each bias comes as the gguf package's decoding of its blocks, and the model loads."""
    import gguf

    from braidinfer.loader.quantized import QuantizedTensor
    from braidinfer.weights import load_model

    _, ref = qwen2_gguf
    path = tmp_path / "tiny-qwen2.Q8_0-biases.gguf"
    write_gguf(ref, path, "qwen2", qtype="Q8_0", quantized_biases=True)
    source = resolve_model(str(path))
    assert "model.layers.0.self_attn.q_proj.weight" in source.quantized_names()
    assert not any(name.endswith(".bias") for name in source.quantized_names())
    ours = dict(source.iter_weights(torch.float32, progress=False, quantized=True))
    kind = gguf.GGMLQuantizationType.Q8_0
    for name, tensor in ref.state_dict().items():
        if name.endswith(".bias"):
            expected = gguf.quants.dequantize(gguf.quants.quantize(tensor.float().numpy(), kind), kind)
            assert not isinstance(ours[name], QuantizedTensor), name
            assert torch.equal(ours[name], torch.from_numpy(expected)), name
    cfg = ModelConfig.from_hf_config(source.hf_config)
    model = load_model(Qwen2ForCausalLM, cfg, source, torch.device("cpu"), torch.float32, progress=False,
                       quantized=True)
    assert model.quantized_modules
