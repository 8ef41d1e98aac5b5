"""ERNIE-4.5 from GGUF (llama.cpp's `ernie4_5` architecture: q/k rows kept interleaved, explicit head_dim as
key_length, tied embeddings without output.weight). transformers has no GGUF import for it, so the references are
the state dict the file was written from and the same model saved by transformers."""
from __future__ import annotations

import pytest
import torch

from braidinfer.loader import resolve_model
from braidinfer.models.config import ModelConfig
from braidinfer.models.ernie4_5 import Ernie4_5ForCausalLM
from braidinfer.weights import load_model
from tests.support.gguf_export import write_gguf

SHAPE = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, use_bias=True)


@pytest.fixture(scope="module")
def ernie(tmp_path_factory):
    """(GGUF path, directory saved by transformers, the model)."""
    import transformers

    torch.manual_seed(8)
    model = transformers.Ernie4_5ForCausalLM(transformers.Ernie4_5Config(**SHAPE)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    directory = tmp_path_factory.mktemp("ernie4_5")
    model.save_pretrained(directory / "hf")
    write_gguf(model, directory / "tiny-ernie4_5.F32.gguf", "ernie4_5")
    return str(directory / "tiny-ernie4_5.F32.gguf"), str(directory / "hf"), model


def test_weights_as_written(ernie):
    path, _, ref = ernie
    ours = dict(resolve_model(path).iter_weights(torch.float32, progress=False))
    expected = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}  # tied: no output.weight
    assert set(ours) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name


def test_config_matches_transformers_config(ernie):
    path, hf_dir, _ = ernie
    from_gguf = resolve_model(path).hf_config
    assert from_gguf["architectures"] == ["Ernie4_5ForCausalLM"] and from_gguf["model_type"] == "ernie4_5"
    assert from_gguf["use_bias"] is True and from_gguf["tie_word_embeddings"] is True
    ours, theirs = ModelConfig.from_hf_config(from_gguf), ModelConfig.from_hf_config(resolve_model(hf_dir).hf_config)
    for key in ("architecture", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "tie_word_embeddings"):
        assert getattr(ours, key) == getattr(theirs, key), key


def test_loaded_model_equals_the_safetensors_load(ernie):
    """Both sources go through the model's q/k row reordering once: every parameter comes out the same."""
    path, hf_dir, _ = ernie
    models = []
    for source in (resolve_model(path), resolve_model(hf_dir)):
        cfg = ModelConfig.from_hf_config(source.hf_config)
        models.append(load_model(Ernie4_5ForCausalLM, cfg, source, torch.device("cpu"), torch.float32, progress=False))
    ours, theirs = (dict(m.named_parameters()) for m in models)
    assert set(ours) == set(theirs)
    for name, p in theirs.items():
        assert torch.equal(ours[name], p), name


def test_quantised_gguf_keeps_blocks_and_matches_its_dequantised_load(ernie, tmp_path):
    """Q8_0 q/k blocks go through the model's row reordering as whole rows: every projection computing from the
    blocks gives what the same file dequantised at load gives."""
    _, _, model = ernie
    path = tmp_path / "tiny-ernie4_5.Q8_0.gguf"
    write_gguf(model, path, "ernie4_5", qtype="Q8_0")
    source = resolve_model(str(path))
    cfg = ModelConfig.from_hf_config(source.hf_config)
    cpu = torch.device("cpu")
    kept = load_model(Ernie4_5ForCausalLM, cfg, source, cpu, torch.float32, progress=False, quantized=True)
    decoded = load_model(Ernie4_5ForCausalLM, cfg, source, cpu, torch.float32, progress=False)
    assert any(name.endswith("qkv_proj") for name in kept.quantized_modules), kept.quantized_modules
    x = torch.randn(3, SHAPE["hidden_size"], generator=torch.Generator().manual_seed(0))
    for layer_kept, layer_decoded in zip(kept.model.layers, decoded.model.layers):
        torch.testing.assert_close(layer_kept.self_attn.qkv_proj(x), layer_decoded.self_attn.qkv_proj(x),
                                   rtol=1e-5, atol=1e-5)
