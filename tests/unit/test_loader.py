"""The model loader: resolution of every kind of model reference, weight streaming, configs and errors.

References are independent of the loader: transformers' own GGUF import for the embedded model, and tiny random
transformers models saved with `save_pretrained` (or written to GGUF through the `gguf` package's name map and
llama.cpp's q/k permutation) for the rest.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct

import numpy as np
import pytest
import torch

from braidinfer.errors import InvalidModelError, ModelNotFoundError, UnsupportedModelError
from braidinfer.loader import ModelSource, default_model_path, resolve_model
from braidinfer.models import ModelConfig
from tests.conftest import build_tiny_model
from tests.support.gguf_export import add_shape_metadata, llamacpp_permute

TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def _weights(source: ModelSource, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return dict(source.iter_weights(dtype, progress=False))


def _assert_same_weights(ours: dict, ref: dict, tied: bool):
    expected = set(ref) - ({"lm_head.weight"} if tied else set())
    assert set(ours) == expected
    for name in expected:
        assert ours[name].shape == ref[name].shape, name
        assert torch.allclose(ours[name].float(), ref[name].float()), name


# --- the embedded GGUF against transformers' own import of it -----------------------------------------------------
@pytest.fixture(scope="module")
def embedded_source() -> ModelSource:
    return resolve_model(None)


def test_default_model_path_is_the_embedded_gguf(embedded_gguf):
    assert default_model_path() == embedded_gguf
    assert os.path.isfile(default_model_path())


def test_embedded_source_metadata(embedded_source, embedded_gguf):
    assert embedded_source.format == "gguf"
    assert embedded_source.path == embedded_gguf
    assert embedded_source.name == "SmolLM2-135M-Instruct.Q4_1"
    assert resolve_model(embedded_gguf).hf_config == embedded_source.hf_config


def test_embedded_hf_config_matches_transformers(embedded_source, hf_smollm):
    ours, ref = embedded_source.hf_config, hf_smollm.config
    assert ours["architectures"] == ["LlamaForCausalLM"] and ours["model_type"] == "llama"
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "head_dim", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert ours[key] == getattr(ref, key), key
    assert ours["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    assert ours["rope_theta"] == pytest.approx(ref.rope_parameters["rope_theta"])
    assert "rope_scaling" not in ours


def test_embedded_weights_match_transformers(embedded_source, hf_smollm):
    ref = hf_smollm.state_dict()
    ours = _weights(embedded_source)
    _assert_same_weights(ours, ref, tied=hf_smollm.config.tie_word_embeddings)
    assert all(t.dtype == torch.float32 for t in ours.values())


def test_embedded_weights_cast_to_bfloat16(embedded_source, hf_smollm):
    name, tensor = next(iter(embedded_source.iter_weights(torch.bfloat16, progress=False)))
    assert tensor.dtype == torch.bfloat16
    assert torch.equal(tensor, hf_smollm.state_dict()[name].to(torch.bfloat16))


def test_embedded_tokenizer_has_chat_template(embedded_source, smollm_tokenizer):
    tok = embedded_source.load_tokenizer()
    assert tok.chat_template and tok.chat_template == smollm_tokenizer.chat_template
    text = "Hello, world! <|im_start|>user"
    assert tok(text)["input_ids"] == smollm_tokenizer(text)["input_ids"]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")


# --- safetensors directories --------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny_dir(request, tmp_path_factory, smollm_tokenizer):
    """(directory, transformers reference model) of a tiny random model saved as one safetensors file."""
    path = tmp_path_factory.mktemp(f"loader-{request.param}")
    return str(path), build_tiny_model(request.param, path, smollm_tokenizer, **TINY)


def test_safetensors_weights_match_state_dict(tiny_dir):
    path, ref = tiny_dir
    source = resolve_model(path)
    assert (source.format, source.path, source.name) == ("safetensors", path, os.path.basename(path))
    _assert_same_weights(_weights(source), ref.state_dict(), tied=ref.config.tie_word_embeddings)


def test_safetensors_dtype_cast(tiny_dir):
    path, ref = tiny_dir
    ours = _weights(resolve_model(path), torch.float16)
    assert all(t.dtype == torch.float16 for t in ours.values())
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref.state_dict()[name].to(torch.float16)), name


def test_safetensors_hf_config_is_config_json(tiny_dir):
    path, ref = tiny_dir
    with open(os.path.join(path, "config.json")) as f:
        assert resolve_model(path).hf_config == json.load(f)
    assert resolve_model(path).hf_config["hidden_size"] == ref.config.hidden_size


def test_sharded_safetensors(tmp_path, smollm_tokenizer):
    import transformers

    torch.manual_seed(0)
    ref = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY, head_dim=16)).eval()
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    _assert_same_weights(_weights(resolve_model(tmp_path)), ref.state_dict(), tied=False)


def test_sharded_safetensors_missing_shard(tmp_path):
    import transformers

    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(InvalidModelError, match=re.escape(shard.name)):
        resolve_model(tmp_path)


def _save_tiny_llama(path) -> None:
    import transformers

    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(path, max_shard_size="100KB")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_sharded_safetensors_corrupt_shard(tmp_path, damage):
    """A shard cut short (an interrupted copy) or overwritten is named when the model resolves, before any weight is
    read (the engine used to fail midway through the load with safetensors' own error)."""
    _save_tiny_llama(tmp_path)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100] if damage == "truncated" else b"not a safetensors file")
    with pytest.raises(InvalidModelError, match=re.escape(str(shard))):
        resolve_model(tmp_path)


def test_directory_tokenizer(tiny_dir, smollm_tokenizer):
    tok = resolve_model(tiny_dir[0]).load_tokenizer()
    assert tok("Hello there")["input_ids"] == smollm_tokenizer("Hello there")["input_ids"]
    assert tok.chat_template == smollm_tokenizer.chat_template


def test_directory_without_tokenizer(tmp_path, tiny_dir):
    path = tmp_path / "weights-only"
    path.mkdir()
    for file in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_dir[0], file), path / file)
    source = resolve_model(path)  # weights and config are enough to resolve
    with pytest.raises(InvalidModelError, match="tokenizer"):
        source.load_tokenizer()


@pytest.mark.parametrize("eos, expected", [(7, (2, 7)), ([2, 7, 9], (2, 7, 9)), (None, (2,))])
def test_generation_config_eos_joins_the_stop_ids(tmp_path, eos, expected):
    """generation_config.json's eos_token_id (an id or a list) adds to config.json's (2 here), as Llama 3 Instruct's
    <|eot_id|> does; transformers' generate stops on it."""
    _save_tiny_llama(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": eos}))
    source = resolve_model(tmp_path)
    assert source.generation_config["eos_token_id"] == eos
    assert ModelConfig.from_hf_config(source.hf_config, source.generation_config).eos_token_ids == expected
    assert ModelConfig.from_hf_config(source.hf_config).eos_token_ids == (2,)


def test_generation_config_with_a_bad_eos_names_it(tmp_path):
    _save_tiny_llama(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "<|eot_id|>"}))
    source = resolve_model(tmp_path)
    with pytest.raises(InvalidModelError, match="generation_config.json eos_token_id"):
        ModelConfig.from_hf_config(source.hf_config, source.generation_config)


def test_engine_stops_on_generation_config_eos_like_transformers(tmp_path, smollm_tokenizer):
    """The engine's greedy reply ends where transformers' generate (which reads generation_config.json) ends it:
    on a stop id listed only in generation_config.json."""
    from transformers import AutoModelForCausalLM

    from braidinfer import LLM, SamplingParams

    ref = build_tiny_model("llama", tmp_path, smollm_tokenizer)
    prompt = [5, 6, 7, 8]
    free = ref.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                        eos_token_id=None, pad_token_id=0)[0, 4:].tolist()
    stop = next(t for i, t in enumerate(free) if i > 0 and t not in free[:i])  # ends the reply mid-way
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, stop]}))
    expected = AutoModelForCausalLM.from_pretrained(tmp_path).generate(
        torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 4:].tolist()
    assert expected == free[:free.index(stop) + 1]
    with LLM(model=str(tmp_path), device="cpu", dtype="float32", progress=False) as llm:
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8))[0]
    assert (out.token_ids, out.finish_reason) == (expected, "stop")


@pytest.mark.parametrize("quant_method", ["fp8", "gptq", "awq", "bitsandbytes", "compressed-tensors"])
def test_prequantized_safetensors_is_refused_up_front(tmp_path, quant_method):
    """A checkpoint whose config.json has a quantization_config holds quantised weights plus scale tensors; it is
    refused when it resolves, naming the method, not when a scale tensor finds no place in the model."""
    _save_tiny_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": quant_method}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=f"quant_method '{quant_method}'.*bf16.*GGUF"):
        resolve_model(tmp_path)


LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 538090408\n")


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "gguf", "directory of a gguf"])
def test_git_lfs_pointer_says_to_fetch_the_file(tmp_path, layout):
    """A clone made without Git LFS holds ~130-byte pointers in place of the weights: the error says so."""
    target = tmp_path / "model.gguf" if layout == "gguf" else tmp_path
    if layout == "safetensors":
        (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
        pointer = tmp_path / "model.safetensors"
    elif layout == "sharded":
        _save_tiny_llama(tmp_path)
        pointer = sorted(tmp_path.glob("model-*.safetensors"))[0]
    else:
        pointer = tmp_path / "model.gguf"
    pointer.write_bytes(LFS_POINTER)
    with pytest.raises(InvalidModelError, match=re.escape(str(pointer)) + ".*Git LFS pointer.*git lfs pull"):
        resolve_model(target)


# --- the local Hugging Face hub cache ------------------------------------------------------------------------------
def _fake_hub_cache(cache, repo_id: str, model_dir: str, commit: str = "0123abcd" * 5):
    """The layout huggingface_hub writes: blobs, snapshot symlinks into them, and refs/main naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(model_dir))):
        blob = repo / "blobs" / f"blob{i:04d}"
        shutil.copy(os.path.join(model_dir, name), blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_from_hf_hub_cache(tmp_path, monkeypatch, tiny_dir):
    path, ref = tiny_dir
    snapshot = _fake_hub_cache(tmp_path / "hub", "org/tiny", path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    source = resolve_model("org/tiny")
    assert (source.name, source.path, source.format) == ("org/tiny", str(snapshot), "safetensors")
    _assert_same_weights(_weights(source), ref.state_dict(), tied=ref.config.tie_word_embeddings)
    assert source.load_tokenizer()("hi")["input_ids"]


def test_hub_id_from_hf_home(tmp_path, monkeypatch, tiny_dir):
    snapshot = _fake_hub_cache(tmp_path / "home" / "hub", "org/tiny", tiny_dir[0])
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert resolve_model("org/tiny").path == str(snapshot)


def test_hub_id_absent_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("Qwen/Qwen3-0.6B")
    assert "Qwen/Qwen3-0.6B" in str(info.value) and str(tmp_path / "empty-cache") in str(info.value)


# --- tiny GGUF files written from transformers models ---------------------------------------------------------------

def _llamacpp_rope_freqs(head_dim, theta, factor, low, high, old_len) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py LlamaModel.generate_extra_tensors (llama3 rope), verbatim arithmetic.
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(1)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _write_gguf(model, path, rope_freqs: np.ndarray | None = None) -> None:
    """Writes `model` as an F32 GGUF the way llama.cpp's converter lays it out (names, q/k permutation, metadata)."""
    import gguf

    cfg = model.config
    arch = cfg.model_type
    writer = gguf.GGUFWriter(str(path), arch)
    add_shape_metadata(writer, cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    else:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if cfg.bos_token_id is not None:
        writer.add_bos_token_id(cfg.bos_token_id)
    if cfg.eos_token_id is not None:
        writer.add_eos_token_id(cfg.eos_token_id)
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        data = tensor.float().numpy()
        if arch == "llama" and base.endswith("q_proj"):
            data = llamacpp_permute(data, cfg.num_attention_heads)
        elif arch == "llama" and base.endswith("k_proj"):
            data = llamacpp_permute(data, cfg.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(data))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


LLAMA3_ROPE = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)


@pytest.fixture(scope="module")
def tiny_llama_gguf(tmp_path_factory):
    """(path, reference model): a llama with Llama 3.2's rope scaling; head_dim 64 blends 3 rope_freqs entries."""
    import transformers

    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(**{**TINY, "hidden_size": 256, "intermediate_size": 256}, tie_word_embeddings=True,
                                   rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE})
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("gguf-llama") / "tiny-llama.F32.gguf"
    _write_gguf(model, path, _llamacpp_rope_freqs(64, 500000.0, 32.0, 1.0, 4.0, 8192))
    return str(path), model


@pytest.fixture(scope="module")
def tiny_qwen3_gguf(tmp_path_factory):
    import transformers

    torch.manual_seed(2)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=False))
    with torch.no_grad():  # non-trivial norms, so a swapped q_norm / k_norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 4.0)
    path = tmp_path_factory.mktemp("gguf-qwen3") / "tiny-qwen3.F32.gguf"
    _write_gguf(model.eval(), path)
    return str(path), model


def test_gguf_llama_undoes_llamacpp_permutation(tiny_llama_gguf):
    path, ref = tiny_llama_gguf
    source = resolve_model(path)
    _assert_same_weights(_weights(source), ref.state_dict(), tied=True)


def test_gguf_llama_matches_transformers_import(tiny_llama_gguf):
    from transformers import AutoModelForCausalLM

    path, _ = tiny_llama_gguf
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    _assert_same_weights(_weights(resolve_model(path)), hf.state_dict(), tied=True)


def test_gguf_llama_config_and_rope_freqs(tiny_llama_gguf):
    path, ref = tiny_llama_gguf
    cfg = resolve_model(path).hf_config
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert (cfg["hidden_size"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]) == (256, 2, 64, 1000)
    assert cfg["rope_theta"] == 500000.0
    assert cfg["rope_scaling"]["rope_type"] == "llama3"
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        assert cfg["rope_scaling"][key] == pytest.approx(LLAMA3_ROPE[key], rel=1e-4), key
    assert "rope_freqs.weight" not in dict(resolve_model(path).iter_weights(torch.float32, progress=False))


def test_gguf_qwen3_is_not_permuted(tiny_qwen3_gguf):
    path, ref = tiny_qwen3_gguf
    source = resolve_model(path)
    _assert_same_weights(_weights(source), ref.state_dict(), tied=False)
    cfg = source.hf_config
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["model_type"] == "qwen3"
    assert (cfg["head_dim"], cfg["tie_word_embeddings"], cfg["num_hidden_layers"]) == (32, False, 2)
    assert "rope_scaling" not in cfg


def test_directory_with_one_gguf(tmp_path, tiny_qwen3_gguf):
    shutil.copy(tiny_qwen3_gguf[0], tmp_path / "model.gguf")
    source = resolve_model(tmp_path)
    assert source.format == "gguf" and source.path == str(tmp_path / "model.gguf")


def test_gguf_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="rwkv6"):
        resolve_model(path)


def test_engine_unmaps_the_gguf_once_loaded(tmp_path, embedded_gguf):
    """The engine keeps no view of the file after loading: the mapping is gone from the process, the weights it
    serves are its own copies (greedy tokens unchanged), and the source refuses to stream the weights again."""
    import transformers

    from braidinfer import LLM, SamplingParams
    from tests.support.gguf_export import write_gguf

    torch.manual_seed(3)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**TINY, "vocab_size": 49152}, head_dim=32))
    path = tmp_path / "tiny-qwen3.F32.gguf"
    write_gguf(model.eval(), path, "qwen3", tokenizer_from=embedded_gguf)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with LLM(model=str(path), device="cpu", dtype="float32", progress=False) as llm:
        if os.path.exists("/proc/self/maps"):
            with open("/proc/self/maps") as maps:
                assert str(path) not in maps.read()
        out = llm.generate([5, 6, 7, 8], params)[0].token_ids
        expected = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)[0, 4:].tolist()
        assert out == expected
        with pytest.raises(RuntimeError, match="closed"):
            next(llm.engine.source.iter_weights(torch.float32, progress=False))


def test_gguf_without_tokenizer_names_it(tiny_qwen3_gguf):
    source = resolve_model(tiny_qwen3_gguf[0])  # written without tokenizer.* metadata
    with pytest.raises(InvalidModelError, match="no tokenizer"):
        source.load_tokenizer()


def test_gguf_tensor_type_without_a_decoder_fails_at_resolution(tmp_path):
    """A type neither the engine nor the gguf package decodes (Q8_1: llama.cpp's activation format) is named when
    the header is read, before any weight is."""
    import gguf

    path = tmp_path / "q8_1.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1][1]
    writer.add_tensor("blk.0.attn_output.weight", np.zeros((4, block), dtype=np.uint8),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.attn_output\.weight \(Q8_1\)"):
        resolve_model(path)


def _set_tensor_type(path, name: str, type_id: int) -> None:
    """Rewrites the type id of `name` in the GGUF tensor table (an entry: name length, name, n_dims, dims, type)."""
    data = bytearray(path.read_bytes())
    key = name.encode()
    at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, type_id)
    path.write_bytes(bytes(data))


def test_gguf_tensor_type_unknown_to_the_gguf_package(tmp_path):
    """A type id newer than the installed `gguf` package (llama.cpp adds types) is named with the package's version,
    not reported as a corrupt file."""
    from importlib.metadata import version

    import gguf

    path = tmp_path / "newtype.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    type_id = 1000
    assert type_id not in {int(t) for t in gguf.GGMLQuantizationType}
    _set_tensor_type(path, "blk.0.attn_norm.weight", type_id)
    with pytest.raises(UnsupportedModelError, match=rf"type id {type_id}\b.*gguf package \(version "
                                                    rf"{re.escape(version('gguf'))}\).*upgrade.*requantise"):
        resolve_model(path)


def test_split_gguf_is_refused_with_the_merge_command(tmp_path, tiny_llama_gguf):
    """A GGUF split by llama.cpp's gguf-split (NAME-0000k-of-0000N.gguf, split.count metadata): each part and the
    directory of the parts are refused naming the merge command (the first part used to fail for lacking the others'
    tensors, the others for lacking general.architecture)."""
    import gguf

    reader = gguf.GGUFReader(tiny_llama_gguf[0])
    writer = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama", split_max_tensors=8)
    for field in reader.fields.values():
        if field.name.startswith("llama."):
            writer.add_key_value(field.name, field.contents(), field.types[0],
                                 sub_type=field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    parts = sorted(tmp_path.glob("*.gguf"))
    assert [p.name for p in parts[:2]] == [f"tiny-0000{i}-of-{len(parts):05d}.gguf" for i in (1, 2)]
    merge = re.escape(f"llama-gguf-split --merge {parts[0]} {tmp_path / 'tiny.gguf'}")
    for part in parts:
        with pytest.raises(UnsupportedModelError, match=f"{re.escape(str(part))} is one part.*not supported.*{merge}"):
            resolve_model(part)
    with pytest.raises(UnsupportedModelError, match=f"parts of one split GGUF.*not supported.*{merge}"):
        resolve_model(tmp_path)


# --- errors ---------------------------------------------------------------------------------------------------------
def test_nonexistent_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match=re.escape(str(missing))):
        resolve_model(missing)


def test_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a model\n")
    with pytest.raises(InvalidModelError, match=re.escape(str(path))):
        resolve_model(path)


def test_empty_directory(tmp_path):
    with pytest.raises(InvalidModelError, match="config.json") as info:
        resolve_model(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_config_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(InvalidModelError, match="model.safetensors") as info:
        resolve_model(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_config_beside_a_gguf_names_the_gguf(tmp_path, tiny_qwen3_gguf):
    """config.json makes a directory a safetensors one; with only a .gguf beside it, the error names that file."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    shutil.copy(tiny_qwen3_gguf[0], tmp_path / "model-Q8_0.gguf")
    with pytest.raises(InvalidModelError, match=re.escape(str(tmp_path / "model-Q8_0.gguf"))):
        resolve_model(tmp_path)


@pytest.mark.parametrize("config_class", ["Gemma3Config", "Qwen2VLConfig"])
def test_multimodal_checkpoint_is_refused_by_architecture(config_class):
    """A vision-language checkpoint keeps its language model's sizes under text_config: the error names its
    architecture (not the sizes missing at the top level)."""
    import transformers

    architecture = config_class.replace("Config", "ForConditionalGeneration")
    config = {**getattr(transformers, config_class)().to_dict(), "architectures": [architecture]}
    assert "text_config" in config and "hidden_size" not in config
    with pytest.raises(UnsupportedModelError, match=f"'{architecture}' is not supported.*text_config"):
        ModelConfig.from_hf_config(config)


def test_corrupt_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InvalidModelError, match="config.json"):
        resolve_model(tmp_path)


@pytest.mark.parametrize("content", [b"", b"garbage " * 100, b"GGUF" + b"\xff" * 60])
def test_garbage_gguf(tmp_path, content):
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    with pytest.raises(InvalidModelError, match=re.escape(str(path))):
        resolve_model(path)
