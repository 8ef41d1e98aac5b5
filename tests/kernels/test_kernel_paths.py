"""Which path each layer runs, as the engine records it (LLMEngine.kernel_paths), on the CPU (PyTorch everywhere) and
with the kernel plan an engine chooses on CUDA, forced here on the CPU where the kernels run in Triton's interpreter;
and the GEMV path's deferred norm / activation against plain PyTorch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from braidinfer import LLM
from braidinfer.layers import KernelPlan, Linear, RMSNorm, SiluAndMul, select_kernels
from tests.conftest import build_tiny_model

TORCH_BACKEND = "attention backend: torch (SDPA per sequence over K/V gathered through its page table)"


def test_paths_of_a_cpu_engine_and_of_the_kernel_plan(tmp_path, smollm_tokenizer):
    build_tiny_model("qwen3", tmp_path, smollm_tokenizer, num_hidden_layers=2)
    with LLM(model=str(tmp_path), device="cpu", dtype="float32", num_kv_pages=16, progress=False) as llm:
        engine = llm.engine
        print("\n".join(["CPU engine:", *engine.kernel_paths]))
        assert engine.kernel_plan == KernelPlan()
        assert engine.kernel_paths == [
            "linear (qkv_proj, o_proj, gate_up_proj, down_proj, lm_head): torch F.linear",
            "attention (attn): qk-norm + rope in torch, then the backend's kv write and attend",
            "silu_and_mul (act_fn): torch",
            "rmsnorm (input_layernorm, post_attention_layernorm, norm): torch",
            TORCH_BACKEND,
        ]
        select_kernels(engine.model, KernelPlan.choose(True, True, torch.device("cuda")))  # CUDA's default plan
        print("\n".join(["kernel plan:", *engine.kernel_paths]))
        gemv_prologue = "steps of <= 1 row: in the next projection's gemv prologue"
        assert engine.kernel_paths == [
            "linear (qkv_proj, o_proj, gate_up_proj, down_proj): torch F.linear; steps of <= 1 row: triton gemv",
            "attention (attn): qk-norm + rope + kv write in triton qk_norm_rope_write_kv, then the backend's attend",
            f"silu_and_mul (act_fn): triton silu_and_mul; {gemv_prologue}",
            "rmsnorm (input_layernorm, post_attention_layernorm): triton rms_norm / fused_add_rms_norm; "
            + gemv_prologue,
            "rmsnorm (norm): triton rms_norm / fused_add_rms_norm",
            "linear (lm_head): torch F.linear",
            TORCH_BACKEND,
        ]


def _rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("rows", [1, 2])
def test_norm_then_projection(rows, device):
    """One row: the norm hands its inputs to the projection, whose GEMV kernel does the add, the norm and the
    product, and the residual stream comes back from that kernel. Two rows: the norm runs, then F.linear."""
    plan = KernelPlan(triton=True, gemv=True)
    g = torch.Generator().manual_seed(0)
    norm, proj = RMSNorm(64, 1e-6).to(device), Linear(64, 48, bias=True).to(device)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=g) + 0.5)
    norm.plan, proj.plan, norm.feeds_gemv = plan, plan, True
    x, residual = (torch.randn(rows, 64, generator=g).to(device) for _ in range(2))
    with torch.no_grad():
        normed, stream = norm(x, residual)
        y = proj(normed)
        assert torch.is_tensor(normed) == (rows > 1)
        stream = stream if torch.is_tensor(stream) else stream.value()
        torch.testing.assert_close(stream, x + residual)
        want = F.linear(_rms_norm(x + residual, norm.weight, 1e-6), proj.weight, proj.bias)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        first = proj(norm(x))  # the first layer's norm: no residual
        torch.testing.assert_close(first, F.linear(_rms_norm(x, norm.weight, 1e-6), proj.weight, proj.bias),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2])
def test_activation_then_projection(rows, device):
    plan = KernelPlan(triton=True, gemv=True)
    g = torch.Generator().manual_seed(1)
    act, down = SiluAndMul(), Linear(32, 16, bias=False).to(device)
    act.plan, down.plan, act.feeds_gemv = plan, plan, True
    gate_up = (3 * torch.randn(rows, 64, generator=g)).to(device)
    gate, up = gate_up[:, :32], gate_up[:, 32:]
    with torch.no_grad():
        assert torch.is_tensor(act(gate_up)) == (rows > 1)
        torch.testing.assert_close(down(act(gate_up)), F.linear(gate * torch.sigmoid(gate) * up, down.weight),
                                   rtol=1e-5, atol=1e-5)
