"""GPT-2 GGUF files laid out as llama.cpp's converter writes them (arch "gpt2": Conv1D weights transposed to
[out, in], no mask buffers, the tied head written again as output.weight) load as the HF checkpoint does."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from braidinfer.loader import resolve_model
from braidinfer.models import ModelConfig, model_class
from braidinfer.weights import load_model


def _write_gguf(model, path, qtype: str | None = None) -> None:
    """llama.cpp's convert_hf_to_gguf.py GPT2Model: metadata, names, transposes and the duplicated head; `qtype`
    (e.g. "Q8_0") stores the layers' projection matrices quantised with the `gguf` package's quantiser."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.n_positions)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(4 * cfg.n_embd)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    writer.add_vocab_size(cfg.vocab_size)  # llama.cpp writes the vocabulary; its size is what the loaders read
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, cfg.n_layer)
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith((".attn.bias", ".attn.masked_bias")) or hf_name == "lm_head.weight":
            continue
        data = tensor.float()
        if hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            data = data.t()
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        if qtype is not None and name.startswith("blk.") and data.dim() == 2:
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(data.numpy()), kind), raw_dtype=kind)
            continue
        writer.add_tensor(name, np.ascontiguousarray(data.numpy()))
        if name == "token_embd.weight":  # "GPT2 output is tied to (same as) wte in original model"
            writer.add_tensor("output.weight", np.ascontiguousarray(data.numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gpt2_gguf(tmp_path_factory):
    """(GGUF path, HF checkpoint directory, reference model)."""
    import transformers

    torch.manual_seed(8)
    cfg = transformers.GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1,
                                  eos_token_id=2, layer_norm_epsilon=1e-5)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped or dropped one would show
        for p in model.parameters():
            p.normal_(0, 0.5)
    directory = tmp_path_factory.mktemp("gpt2-hf")
    model.save_pretrained(directory)
    path = tmp_path_factory.mktemp("gpt2-gguf") / "tiny-gpt2.F32.gguf"
    _write_gguf(model, path)
    return str(path), str(directory), model


def _load(path: str):
    cfg = ModelConfig.from_hf_config(resolve_model(path).hf_config)
    return load_model(model_class(cfg), cfg, resolve_model(path), torch.device("cpu"), torch.float32, progress=False)


def test_config(gpt2_gguf):
    path, _, ref = gpt2_gguf
    cfg = ModelConfig.from_hf_config(resolve_model(path).hf_config)
    assert cfg.architecture == "GPT2LMHeadModel"
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 256, 2, 4)
    assert (cfg.max_position_embeddings, cfg.vocab_size, cfg.head_dim) == (128, 1000, 16)
    assert cfg.hf_config["layer_norm_epsilon"] == ref.config.layer_norm_epsilon


def test_loaded_model_equals_the_hf_checkpoint_load(gpt2_gguf):
    path, directory, ref = gpt2_gguf
    from_gguf, from_hf = _load(path), _load(directory)
    hf_state = from_hf.state_dict()
    assert set(from_gguf.state_dict()) == set(hf_state)
    for name, tensor in from_gguf.state_dict().items():
        assert torch.equal(tensor, hf_state[name]), name
    # and the HF load is the reference's own weights, Conv1D transposed
    torch.testing.assert_close(hf_state["model.layers.1.attn.c_attn.weight"],
                               ref.transformer.h[1].attn.c_attn.weight.t(), rtol=0, atol=0)


def test_matches_transformers_gguf_import(gpt2_gguf):
    from transformers import AutoModelForCausalLM

    path, _, ref = gpt2_gguf
    # transformers' gpt2 GGUF config mapping reads neither the vocabulary size (it expects a tokenizer) nor
    # n_positions (it maps context_length to n_ctx): give it the config, the tensors still come from the GGUF.
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              config=ref.config)
    ours = _load(path)
    expected = {}
    for name, tensor in hf.state_dict().items():
        if (mapped := ours.load_hook(name, tensor)) is not None:
            expected[mapped[0]] = mapped[1]
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, expected[name].float()), name


def test_quantised_projections_stay_blocks_and_match_the_dequantised_load(gpt2_gguf, tmp_path):
    """llama.cpp stores the projections as [out, in] already: a Q8_0 file's c_attn / c_proj / c_fc stay GGML blocks
    (no transpose at load) and compute what the same file dequantised at load computes."""
    _, _, ref = gpt2_gguf
    path = tmp_path / "tiny-gpt2.Q8_0.gguf"
    _write_gguf(ref, path, qtype="Q8_0")
    source = resolve_model(str(path))
    cfg = ModelConfig.from_hf_config(source.hf_config)
    cpu = torch.device("cpu")
    kept = load_model(model_class(cfg), cfg, source, cpu, torch.float32, progress=False, quantized=True)
    assert not source.dequantized_names(), source.dequantized_names()  # none decoded at load to be transposed
    decoded = load_model(model_class(cfg), cfg, source, cpu, torch.float32, progress=False)
    expected = {f"model.layers.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                    "mlp.c_proj")}
    assert expected <= set(kept.quantized_modules), kept.quantized_modules
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    h = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    for layer_kept, layer_decoded in zip(kept.model.layers, decoded.model.layers):
        for module, inp in (("attn.c_attn", x), ("attn.c_proj", x), ("mlp.c_fc", x), ("mlp.c_proj", h)):
            torch.testing.assert_close(layer_kept.get_submodule(module)(inp), layer_decoded.get_submodule(module)(inp),
                                       rtol=1e-5, atol=1e-5)
    # and the dequantised load is the reference's weights up to Q8_0's rounding
    torch.testing.assert_close(decoded.model.layers[1].attn.c_attn.weight, ref.transformer.h[1].attn.c_attn.weight.t(),
                               rtol=0, atol=0.02)
