"""Weights kept quantised on the GPU (bf16, the default path: FlashInfer, CUDA graphs, GEMV kernels): the engine
computes what the same GGUF dequantised at load computes, to bf16 rounding, holds fewer weight bytes, and runs the
quantised kernels."""
from __future__ import annotations

import pytest
import torch

from braidinfer import LLM, SamplingParams
from braidinfer.loader.gguf_file import GGUFCheckpoint
from tests.gpu.test_gpu_parity import DEFAULT_PATH_TOL
from tests.integration.test_quantized_engine import qwen3_qtype
from tests.support.family_parity import random_prompts
from tests.support.numerics import assert_same_greedy
from tests.support.quantized_gguf import write_quantized_gguf
from tests.unit.test_quantized_weights import SHAPE, llama_qtype

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BASE = dict(device="cuda", dtype="bfloat16", progress=False, gpu_memory_utilization=0.3, max_model_len=256)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def quantized_path(request, tmp_path_factory, smollm_tokenizer):
    import transformers

    torch.manual_seed(11)
    if request.param == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, tie_word_embeddings=True))
        qtype_of = llama_qtype
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SHAPE, head_dim=64,
                                                                       tie_word_embeddings=False))
        qtype_of = qwen3_qtype
    path = tmp_path_factory.mktemp("qgpu") / f"tiny-{request.param}.gguf"
    write_quantized_gguf(model.eval(), path, qtype_of)
    with pytest.MonkeyPatch.context() as mp:  # the tiny files carry no vocabulary of their own
        mp.setattr(GGUFCheckpoint, "load_tokenizer", lambda self: smollm_tokenizer)
        yield str(path)


def test_quantised_engine_agrees_with_dequantised(quantized_path):
    prompts = random_prompts([7, 30, 12], SHAPE["vocab_size"], seed=4)
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=5, ignore_eos=True)
    with LLM(model=quantized_path, weight_format="dequantize", **BASE) as plain:
        want = plain.generate(prompts, params)  # one batch: graph-captured decode steps of three rows
        want_alone = plain.generate(prompts[0], params)[0]  # one row: the GEMV path
        plain_bytes = plain.memory_stats()["weight_bytes"]
    with LLM(model=quantized_path, **BASE) as auto:
        assert any("triton quant_linear" in line for line in auto.engine.kernel_paths), auto.engine.kernel_paths
        # one-row steps: the norms and SiLU-and-mul write x as the quantised projections' int8 rows
        deferred = [line for line in auto.engine.kernel_paths if "gemv prologue" in line]
        assert any(line.startswith("rmsnorm") for line in deferred), auto.engine.kernel_paths
        assert any(line.startswith("silu_and_mul") for line in deferred), auto.engine.kernel_paths
        # and the Triton decode attention of graph decodes writes its output as o_proj's int8 rows
        assert any(line.startswith("attention") and "int8 rows" in line for line in auto.engine.kernel_paths)
        got = auto.generate(prompts, params)
        got_alone = auto.generate(prompts[0], params)[0]
        auto_bytes = auto.memory_stats()["weight_bytes"]
    for w, g in [*zip(want, got), (want_alone, got_alone)]:
        assert_same_greedy(w.token_ids, [dict(x.top) for x in w.logprobs],
                           g.token_ids, [dict(x.top) for x in g.logprobs], DEFAULT_PATH_TOL)
    assert auto_bytes < 0.75 * plain_bytes, (auto_bytes, plain_bytes)
