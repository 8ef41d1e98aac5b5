"""The load summary's lines (braidinfer/weight_report.py), against values written out by hand."""
from __future__ import annotations

import torch
from torch import nn

from braidinfer.weight_report import NAMES_SHOWN, load_summary


def test_dequantised_tensors_are_grouped_by_reason_in_layer_order():
    model = nn.Linear(4, 2, bias=False)  # 8 float32 weights: 32 bytes
    no_kernel = "Q3_K: no kernel for this type"
    hooked = "Q5_K: changed by the LlamaForCausalLM tensor hook"
    layers = [0, 1, 2, 10, 11]
    dequantized = {f"model.layers.{i}.mlp.down_proj.weight": no_kernel for i in layers}
    dequantized["model.layers.3.self_attn.q_proj.weight"] = hooked
    quantized = {name: "Q3_K" for name in dequantized} | {
        "model.layers.3.self_attn.q_proj.weight": "Q5_K", "model.layers.0.mlp.up_proj.weight": "Q4_K",
        "model.layers.1.mlp.up_proj.weight": "Q4_K", "model.embed_tokens.weight": "Q6_K"}
    lines = load_summary(model, quantized, dequantized)
    assert NAMES_SHOWN == 3
    assert lines == [
        "weights: 0.0 MiB",
        "kept quantised: 2 Q4_K, 1 Q6_K",
        f"dequantised ({no_kernel}): 5 tensors: model.layers.0.mlp.down_proj.weight, "
        "model.layers.1.mlp.down_proj.weight, model.layers.2.mlp.down_proj.weight, and 2 more",
        f"dequantised ({hooked}): 1 tensor: model.layers.3.self_attn.q_proj.weight",
    ]


def test_nothing_dequantised_gives_no_such_line():
    model = nn.Linear(512, 1024, bias=False, dtype=torch.bfloat16)  # 1 MiB
    assert load_summary(model, {"lm_head.weight": "Q8_0"}, {}) == ["weights: 1.0 MiB", "kept quantised: 1 Q8_0"]
