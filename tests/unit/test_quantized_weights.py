"""GGUF weights kept quantised: the loader's QuantizedTensor (rows in HF order, q/k un-permuted as whole rows of
blocks), QuantLinear with parts of mixed types and QuantEmbedding, each against gguf's numpy decoder followed by a
plain float32 matmul or index (the independent reference)."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf.quants import dequantize as gguf_dequantize

from braidinfer.layers.quant_embedding import QuantEmbedding
from braidinfer.layers.quant_linear import QuantLinear
from braidinfer.loader import resolve_model
from braidinfer.loader.quantized import QUANTIZED_TYPES, QuantizedTensor
from tests.support.gguf_quant import quantize
from tests.support.quantized_gguf import write_quantized_gguf

SHAPE = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
# Every supported type, a Q4_K_M-like mix inside the fused q/k/v, in the second layer's gate/up the 5-bit fallbacks
# llama.cpp writes for rows that are not a whole number of 256-weight blocks, and one type without a kernel (Q2_K).
LLAMA_TYPES = {"q_proj": "Q4_K", "k_proj": "Q4_K", "v_proj": "Q6_K", "o_proj": "Q8_0", "gate_proj": "Q4_0",
               "up_proj": "Q4_1", "down_proj": "Q5_K", "embed_tokens": "Q8_0"}


def llama_qtype(name: str) -> str | None:
    if name == "model.layers.1.self_attn.o_proj.weight":
        return "Q2_K"
    if name.startswith("model.layers.1.mlp.") and name.split(".")[-2] in ("gate_proj", "up_proj"):
        return {"gate_proj": "Q5_0", "up_proj": "Q5_1"}[name.split(".")[-2]]
    return LLAMA_TYPES.get(name.split(".")[-2]) if name.endswith(".weight") else None


def _reference(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    return torch.from_numpy(gguf_dequantize(blocks.numpy(), gguf.GGMLQuantizationType[qtype])).float()


@pytest.fixture(scope="module")
def quantized_llama(tmp_path_factory):
    """(path, reference model holding the dequantised weights, HF name -> qtype written)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, tie_word_embeddings=True)).eval()
    path = tmp_path_factory.mktemp("qgguf") / "tiny-llama.mixed.gguf"
    written = write_quantized_gguf(model, path, llama_qtype)
    return str(path), model, written


def test_quantized_names_are_in_the_kernel_types():
    from braid_kernels.quant import QTYPES

    assert QUANTIZED_TYPES == QTYPES


def test_loader_keeps_supported_types_quantised(quantized_llama):
    path, ref, written = quantized_llama
    source = resolve_model(path)
    tensors = dict(source.iter_weights(torch.float32, progress=False, quantized=True))
    state = ref.state_dict()
    assert set(tensors) == set(state) - {"lm_head.weight"}
    for name, tensor in tensors.items():
        qtype = written.get(name)
        if qtype in QUANTIZED_TYPES:
            assert isinstance(tensor, QuantizedTensor) and tensor.qtype == qtype, name
            assert tensor.shape == tuple(state[name].shape)
            # Rows back in HF order (llama q/k un-permuted as whole rows of blocks) decode to the reference.
            assert torch.equal(_reference(tensor.blocks, qtype), state[name]), name
            assert torch.equal(tensor.dequantize(), state[name]), name
        else:
            assert isinstance(tensor, torch.Tensor), name
            assert torch.equal(tensor, state[name]), name
    assert source.dequantized_names() == {"model.layers.1.self_attn.o_proj.weight": "Q2_K: no kernel for this type"}
    assert set(source.quantized_names()) == {n for n, q in written.items() if q in QUANTIZED_TYPES}


def test_a_gguf_of_types_without_kernels_names_every_tensor_it_dequantises(tmp_path):
    """No tensor of a type with a kernel: every matrix is still noted as dequantised, with the reason (the load
    summary's line), as when one other type has a kernel."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, tie_word_embeddings=True)).eval()
    written = write_quantized_gguf(model, tmp_path / "q2k.gguf", lambda n: "Q2_K" if n.endswith(".weight") and
                                   not n.endswith("norm.weight") else None)
    source = resolve_model(str(tmp_path / "q2k.gguf"))
    assert not source.quantized_names()
    tensors = dict(source.iter_weights(torch.float32, progress=False, quantized=True))
    assert not any(isinstance(t, QuantizedTensor) for t in tensors.values())
    quantized = {n for n, q in written.items() if q == "Q2_K"}
    assert quantized and source.dequantized_names() == dict.fromkeys(quantized, "Q2_K: no kernel for this type")


def test_loader_dequantises_everything_by_default(quantized_llama):
    path, ref, _ = quantized_llama
    tensors = dict(resolve_model(path).iter_weights(torch.float32, progress=False))
    for name, tensor in tensors.items():
        assert isinstance(tensor, torch.Tensor) and torch.equal(tensor, ref.state_dict()[name]), name


def _blocks(rows: int, cols: int, qtype: str, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype))


@pytest.mark.parametrize("form", ["blocks", "float"], ids=["per-call", "decoded-at-load"])
def test_quant_linear_mixed_parts_match_reference(form):
    cols = 256
    parts = [(0, _blocks(64, cols, "Q4_K", 1), "Q4_K"), (64, _blocks(32, cols, "Q4_K", 2), "Q4_K"),
             (96, _blocks(32, cols, "Q6_K", 3), "Q6_K"), (128, torch.randn(16, cols), None)]
    layer = QuantLinear(cols, 144, bias=True, dtype=torch.float32)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(144))
    for start, blocks, qtype in reversed(parts):  # any order
        layer.set_part(start, QuantizedTensor(blocks, qtype, (blocks.shape[0], cols)) if qtype else blocks)
    layer.finalize(form)
    # Q4_K neighbours join into one matrix of blocks: one product per type.
    assert layer.qtypes == ([None] if form == "float" else ["Q4_K", "Q6_K", None])
    weight = torch.cat([_reference(b, q) if q else b for _, b, q in parts])
    x = torch.randn(3, cols)
    torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_rows", [1, 3])
def test_quant_linear_of_blocks_writes_its_parts_in_place_at_one_row(num_rows, monkeypatch):
    """Parts of mixed types, all blocks: at one row of x each part is written into its columns of one output (no
    concatenation), at three they are concatenated; either way the reference product."""
    cols = 256
    parts = [(0, _blocks(64, cols, "Q4_K", 4), "Q4_K"), (64, _blocks(32, cols, "Q6_K", 5), "Q6_K"),
             (96, _blocks(32, cols, "Q4_K", 6), "Q4_K")]
    layer = QuantLinear(cols, 128, bias=True, dtype=torch.float32)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(128))
    for start, blocks, qtype in parts:
        layer.set_part(start, QuantizedTensor(blocks, qtype, (blocks.shape[0], cols)))
    layer.finalize("blocks")
    assert layer.qtypes == ["Q4_K", "Q6_K", "Q4_K"]
    in_place = []
    parts_in_place = layer._parts_in_place
    monkeypatch.setattr(layer, "_parts_in_place", lambda x: in_place.append(x) or parts_in_place(x))
    x = torch.randn(num_rows, cols)
    weight = torch.cat([_reference(b, q) for _, b, q in parts])
    torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert len(in_place) == (num_rows == 1)


def test_quant_linear_rejects_gaps_and_misfits():
    layer = QuantLinear(256, 64, bias=False, dtype=torch.float32)
    layer.set_part(0, QuantizedTensor(_blocks(32, 256, "Q8_0", 0), "Q8_0", (32, 256)))
    with pytest.raises(ValueError, match="missing"):
        layer.finalize()
    with pytest.raises(ValueError, match="does not fit"):
        layer.set_part(48, torch.zeros(32, 256))
    with pytest.raises(ValueError, match="does not fit"):
        layer.set_part(32, torch.zeros(32, 128))


def test_quantized_tensor_checks_its_arguments():
    with pytest.raises(ValueError, match="qtype"):
        QuantizedTensor(torch.zeros(2, 84, dtype=torch.uint8), "Q2_K", (2, 256))
    with pytest.raises(ValueError, match="uint8"):
        QuantizedTensor(torch.zeros(2, 34), "Q8_0", (2, 32))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q6_K"])
def test_quantized_tensor_layouts(qtype):
    """in_planes regroups the bytes once (the planes tensor is returned as is), gguf_blocks gives the file's bytes
    back, and both layouts dequantise to gguf's values."""
    blocks = _blocks(8, 512, qtype, 4)
    tensor = QuantizedTensor(blocks, qtype, (8, 512))
    planes = tensor.in_planes()
    assert planes.layout == "planes" and planes.in_planes() is planes and planes.shape == tensor.shape
    assert not torch.equal(planes.blocks, blocks) and torch.equal(planes.gguf_blocks(), blocks)
    assert tensor.gguf_blocks() is blocks
    assert torch.equal(planes.dequantize(), _reference(blocks, qtype))
    assert planes.to("cpu").layout == "planes"
    with pytest.raises(ValueError, match="layout"):
        QuantizedTensor(blocks, qtype, (8, 512), "rows")


@pytest.mark.parametrize("form", ["blocks", "float"])
def test_tied_lm_head_reads_the_embedding_planes(form):
    """A tied lm_head gets the embedding's planes tensor (the "blocks" form keeps that very tensor: no second copy)
    and computes the same product from it as from the file's blocks."""
    blocks = _blocks(48, 256, "Q8_0", 9)
    table = QuantEmbedding(48, 256, torch.float32)
    table.set_weight(QuantizedTensor(blocks, "Q8_0", (48, 256)))
    head = QuantLinear(256, 48, bias=False, dtype=torch.float32)
    head.set_part(0, table.quantized())
    head.finalize(form)
    assert (head.part0 is table.weight) == (form == "blocks")
    x = torch.randn(2, 256)
    torch.testing.assert_close(head(x), F.linear(x, _reference(blocks, "Q8_0")), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "Q6_K"])
def test_quant_embedding_matches_reference(qtype):
    blocks = _blocks(40, 256, qtype, 7)
    table = QuantEmbedding(40, 256, torch.float32)
    table.set_weight(QuantizedTensor(blocks, qtype, (40, 256)))
    ids = torch.tensor([3, 0, 39, 3])
    assert torch.equal(table(ids), _reference(blocks, qtype)[ids])


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "Q4_K", "Q6_K"])
def test_quant_embedding_of_no_ids_is_empty_like_nn_embedding(qtype):
    blocks = _blocks(40, 256, qtype, 7)
    table = QuantEmbedding(40, 256, torch.float32)
    table.set_weight(QuantizedTensor(blocks, qtype, (40, 256)))
    ids = torch.tensor([], dtype=torch.long)
    assert torch.equal(table(ids), F.embedding(ids, _reference(blocks, qtype)))


def test_family_tensor_hook_dequantises_what_it_changes(quantized_llama):
    """A family hook that changes a quantised tensor's values gets it dequantised (and reported); one that leaves
    the values alone keeps it quantised."""
    from dataclasses import replace

    from gguf import GGUFReader

    from braidinfer.loader.gguf_families import FAMILIES
    from braidinfer.loader.gguf_file import GGUFCheckpoint

    path, ref, _ = quantized_llama
    changed = "model.layers.0.mlp.down_proj.weight"

    def hook(name, tensor, config):
        return tensor * 2 if name == changed else tensor

    source = resolve_model(path)
    family = replace(FAMILIES["llama"], tensor=hook)
    checkpoint = GGUFCheckpoint(path, GGUFReader(path), source.hf_config, family)
    tensors = dict(checkpoint.tensors(quantized=True))
    assert torch.equal(tensors[changed], ref.state_dict()[changed] * 2)
    assert checkpoint.dequantized[changed] == "Q5_K: changed by the LlamaForCausalLM tensor hook"
    assert isinstance(tensors["model.layers.1.mlp.down_proj.weight"], QuantizedTensor)


def _meta_models(quantized_llama, keep_plain: str):
    """(plain, model, swapped): two meta-device twins of the tiny quantised Llama, `model` with QuantLinears for
    every quantised tensor whose name does not contain keep_plain (`swapped`: the modules replaced)."""
    from braidinfer.models import ModelConfig, model_class
    from braidinfer.quant_modules import swap_quantized_modules

    source = resolve_model(quantized_llama[0])
    cfg = ModelConfig.from_hf_config(source.hf_config)
    with torch.device("meta"):
        plain = model_class(cfg)(cfg)
        model = model_class(cfg)(cfg)
    names = {n: q for n, q in source.quantized_names().items() if keep_plain not in n}
    return plain, model, swap_quantized_modules(model, names, torch.float32, cfg.tie_word_embeddings)


def test_gemv_prologues_into_quant_linears_too(quantized_llama):
    """On the GEMV plan a norm or activation is deferred into plain Linears (layer 1's MLP, left Linear here: the GEMV's
    prologue) and into QuantLinears (which have its kernel write their int8 rows) alike; a step
    whose output goes anywhere else is not (test_layers.py)."""
    from braidinfer.layers.plan import gemv_prologues

    plain, model, swapped = _meta_models(quantized_llama, ".layers.1.mlp.")
    assert "model.layers.1.mlp.gate_up_proj" not in swapped and "model.layers.0.mlp.gate_up_proj" in swapped
    every = gemv_prologues(plain)
    assert {"model.layers.0.input_layernorm", "model.layers.0.mlp.act_fn", "model.layers.1.mlp.act_fn"} <= every
    assert gemv_prologues(model) == every


def test_attention_writes_int8_rows_only_into_int8_quant_linears(quantized_llama):
    """On the GEMV plan the attention of a layer whose o_proj is a QuantLinear of GGUF blocks (layer 0: Q8_0) is told
    to write its output as that projection's int8 rows too (PagedAttention.int8_output); where o_proj is a plain
    Linear (layer 1's Q2_K, dequantised at load; every layer of the dequantised model) it is not, and off the GEMV
    plan never."""
    from braidinfer.layers import KernelPlan, select_kernels
    from braidinfer.layers.quant_linear import QuantLinear
    from braidinfer.models import ModelConfig, model_class
    from braidinfer.weights import load_model

    source = resolve_model(quantized_llama[0])
    cfg = ModelConfig.from_hf_config(source.hf_config)
    models = {quantized: load_model(model_class(cfg), cfg, source, torch.device("cpu"), torch.float32,
                                    progress=False, quantized=quantized, form="blocks")
              for quantized in (True, False)}
    o_projs = [layer.self_attn.o_proj for layer in models[True].model.layers]
    assert isinstance(o_projs[0], QuantLinear) and o_projs[0].takes_int8_rows
    assert not isinstance(o_projs[1], QuantLinear)
    for quantized, model in models.items():
        select_kernels(model, KernelPlan(triton=True, gemv=True))
        got = [layer.self_attn.attn.int8_output for layer in model.model.layers]
        assert got == ([True, False] if quantized else [False, False])
    select_kernels(models[True], KernelPlan(triton=True, gemv=False))
    assert not any(layer.self_attn.attn.int8_output for layer in models[True].model.layers)
