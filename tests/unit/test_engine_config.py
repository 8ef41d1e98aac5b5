"""EngineConfig takes values of each field's own type, names the mistake in one line, and a device that cannot be."""
from __future__ import annotations

import pytest
import torch

from braidinfer import EngineConfig, GuidedDecoding
from braidinfer.engine import pick_device
from braidinfer.errors import InvalidRequestError


@pytest.mark.parametrize("field, value, message", [
    ("page_size", True, "page_size: Input should be a valid integer"),
    ("page_size", "16", "page_size: Input should be a valid integer"),
    ("page_size", 16.0, "page_size: Input should be a valid integer"),
    ("max_num_seqs", True, "max_num_seqs: Input should be a valid integer"),
    ("gpu_memory_utilization", "0.5", "gpu_memory_utilization: Input should be a valid number"),
    ("gpu_memory_utilization", True, "gpu_memory_utilization: Input should be a valid number"),
    ("enforce_eager", "no", "enforce_eager: Input should be a valid boolean"),
    ("enable_prefix_caching", "false", "enable_prefix_caching: Input should be a valid boolean"),
    ("device", "tpu", "device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'$"),
    ("device", "cudaa", "got 'cudaa'$"),
    ("device", "cuda:x", "got 'cuda:x'$"),
    ("device", "cuda:-1", "got 'cuda:-1'$"),
    ("device", "cuda:0 ", "got 'cuda:0 '$"),
])
def test_a_value_of_the_wrong_kind_is_refused_in_one_line(field, value, message):
    with pytest.raises(InvalidRequestError, match=message) as raised:
        EngineConfig(**{field: value})
    assert str(raised.value).startswith("invalid engine configuration: ")
    assert "Value error" not in str(raised.value) and "\n" not in str(raised.value)


def test_values_of_the_field_type_are_kept():
    config = EngineConfig(page_size=8, gpu_memory_utilization=1, device="cuda:1", enforce_eager=True)
    assert (config.page_size, config.gpu_memory_utilization, config.device, config.enforce_eager) == (
        8, 1.0, "cuda:1", True)


def test_a_cuda_index_past_the_machines_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(InvalidRequestError, match="'cuda:7' was asked for but this machine has 2 CUDA device"):
        pick_device("cuda:7")


def test_guided_decoding_is_exported_and_its_errors_read_plainly():
    with pytest.raises(InvalidRequestError) as raised:
        GuidedDecoding(regex="a+", json_object=True)
    assert str(raised.value) == ("invalid guided decoding: guided decoding takes exactly one of json_schema, "
                                 "json_object, grammar, regex, structural_tag")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the default device must be the CPU")
def test_flashinfer_on_the_default_cpu_device_is_refused_before_the_weights_load(tiny_model_dir, monkeypatch):
    """EngineConfig refuses attention_backend='flashinfer' with device='cpu'; with the device left to the engine, the
    engine refuses it once the device is known, before it reads any weight."""
    import braidinfer.engine as engine

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the backend was refused")

    monkeypatch.setattr(engine, "load_model", no_load)
    config = EngineConfig(model=tiny_model_dir("llama"), attention_backend="flashinfer")
    with pytest.raises(InvalidRequestError, match="attention_backend 'flashinfer' cannot run: it needs a CUDA device"):
        engine.LLMEngine(config)
