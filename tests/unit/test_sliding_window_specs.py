"""Which layers the Qwen2 and Mistral configs window, read the way transformers' Qwen2Config / MistralConfig /
MinistralConfig do (their `layer_types` are the reference), and the errors for malformed window settings."""
from __future__ import annotations

import pytest
import torch

from braidinfer.errors import InvalidModelError
from braidinfer.models.config import ModelConfig
from braidinfer.models.registry import model_class

SHAPE = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)


def _windows(config: dict) -> list[int | None]:
    cfg = ModelConfig.from_hf_config(config)
    with torch.device("meta"):
        return [spec.sliding_window for spec in model_class(cfg)(cfg).attention_specs()]


def _expected(transformers_config) -> list[int | None]:
    return [transformers_config.sliding_window if kind == "sliding_attention" else None
            for kind in transformers_config.layer_types]


@pytest.mark.parametrize("settings", [
    dict(use_sliding_window=True, sliding_window=16, max_window_layers=2),
    dict(use_sliding_window=False, sliding_window=16, max_window_layers=2),  # published Qwen2.5: window off
    dict(use_sliding_window=True, sliding_window=16, max_window_layers=0),
])
def test_qwen2_windows_as_transformers(settings):
    import transformers

    published = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **SHAPE, **settings}  # no layer_types
    assert _windows(published) == _expected(transformers.Qwen2Config(**SHAPE, **settings))


@pytest.mark.parametrize("window", [16, None])
def test_mistral_windows_every_layer(window):
    import transformers

    published = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", **SHAPE, "sliding_window": window}
    reference = transformers.MistralConfig(**SHAPE, sliding_window=window)
    assert _windows(published) == [reference.sliding_window] * 4


def test_ministral_follows_layer_types():
    import transformers

    layer_types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    reference = transformers.MinistralConfig(**SHAPE, sliding_window=16, layer_types=layer_types)
    saved = {"architectures": ["MinistralForCausalLM"], **reference.to_dict()}
    assert _windows(saved) == _expected(reference) == [16, None, 16, None]


@pytest.mark.parametrize("config, message", [
    ({"sliding_window": 0}, "sliding_window must be a positive integer"),
    ({"sliding_window": "4096"}, "sliding_window must be a positive integer"),
    ({"sliding_window": 16, "layer_types": ["sliding_attention"] * 3}, "layer_types names 3 layers, the model has 4"),
])
def test_malformed_window_settings(config, message):
    with pytest.raises(InvalidModelError, match=message):
        _windows({"architectures": ["MistralForCausalLM"], **SHAPE, **config})
