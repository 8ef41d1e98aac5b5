"""EngineConfig.kv_cache_dtype: a bfloat16 KV pool under a float32 model on the CPU against transformers whose
attention rounds its (rotated) q, k and v to bfloat16 the same way; what "auto" resolves to; the page budget; the
CUDA refusal."""
from __future__ import annotations

import pytest
import torch

from braidinfer import LLM, SamplingParams
from braidinfer.config import EngineConfig
from braidinfer.engine import kv_cache_dtype
from braidinfer.errors import InvalidRequestError
from tests.support.family_parity import random_prompts

BASE = dict(device="cpu", dtype="float32", progress=False, page_size=4, max_model_len=256)


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    """(path, transformers model in float32, the same model attending over bfloat16-rounded q, k and v)."""
    import copy

    import transformers
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def bf16_attention(module, query, key, value, attention_mask, **kwargs):
        out, weights = sdpa_attention_forward(module, query.bfloat16(), key.bfloat16(), value.bfloat16(),
                                              attention_mask, **kwargs)
        return out.float(), weights

    AttentionInterface.register("bf16_kv_test", bf16_attention)
    path = tiny_model_dir("llama", seed=5)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                            attn_implementation="sdpa").eval()
    rounded = copy.deepcopy(ref)
    rounded.set_attn_implementation("bf16_kv_test")
    return path, ref, rounded


def _gaps(llm, refs, prompts: list[list[int]], steps: int = 6) -> list[float]:
    """Per reference model, the largest |engine top-5 logprob - the reference's| over `steps` greedy steps of each
    prompt, the prompts run as one batch."""
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=steps, logprobs=5, ignore_eos=True))
    gaps = [0.0] * len(refs)
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([prompt + out.token_ids])
        for i, ref in enumerate(refs):
            with torch.no_grad():
                rows = torch.log_softmax(ref(ids).logits[0].float(), -1)[len(prompt) - 1:]
            gaps[i] = max(gaps[i], *(abs(value - rows[step, token].item())
                                     for step, lp in enumerate(out.logprobs) for token, value in lp.top))
    return gaps


def test_a_bfloat16_pool_attends_like_transformers_over_bfloat16_q_k_and_v(llama):
    path, ref, rounded = llama
    prompts = random_prompts([23, 9], ref.config.vocab_size, seed=2)
    with LLM(model=path, kv_cache_dtype="bfloat16", **BASE) as llm:
        assert llm.engine.runner.kv_cache.dtype == torch.bfloat16
        # one sequence alone: the prompt's attention (a prefill) and every decode step's read the bfloat16 pool, in
        # the same SDPA call as the reference's, so the engine sits on the rounded reference (float32 ulps, except
        # where one crosses a bfloat16 rounding boundary) and visibly off the plain one
        alone_rounded, alone_plain = _gaps(llm, [rounded, ref], prompts[:1])
        # two in one batch decode in one padded SDPA call, which rounds its bfloat16 output (|o| 2^-9) differently
        batch_rounded, batch_plain = _gaps(llm, [rounded, ref], prompts)
        print(f"bfloat16 pool, max |logprob gap| to the rounded reference / to float32: alone {alone_rounded:.2e} / "
              f"{alone_plain:.2e}, two in a batch {batch_rounded:.2e} / {batch_plain:.2e}")
        assert alone_rounded < 1e-3 and alone_plain > 10 * alone_rounded
        assert batch_rounded < 1e-2 and batch_plain > 5 * batch_rounded
    with LLM(model=path, **BASE) as llm:  # auto, float weights on the CPU: the model's dtype, exact again
        assert llm.engine.runner.kv_cache.dtype == torch.float32
        to_rounded, to_plain = _gaps(llm, [rounded, ref], prompts)
        assert to_plain < 1e-4 < to_rounded


def test_soft_capped_attention_over_a_bfloat16_pool_computes_in_float32(tmp_path, smollm_tokenizer):
    """Gemma 2 (every layer soft-capped, alternate layers windowed): K and V come out of the bfloat16 pool, but the
    scores, cap and softmax stay float32, as in transformers' eager attention over bfloat16-rounded K and V."""
    import copy

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    from tests.conftest import build_tiny_model_from_config
    from tests.integration.test_parity_gemma2 import gemma2_config

    def rounded_kv(module, query, key, value, attention_mask, **kwargs):
        return eager_attention_forward(module, query, key.bfloat16().float(), value.bfloat16().float(),
                                       attention_mask, **kwargs)

    AttentionInterface.register("bf16_kv_eager_test", rounded_kv)
    AttentionMaskInterface.register("bf16_kv_eager_test", eager_mask)  # the masks eager attention takes
    ref = build_tiny_model_from_config(gemma2_config(), tmp_path, smollm_tokenizer)
    rounded = copy.deepcopy(ref)
    rounded.set_attn_implementation("bf16_kv_eager_test")
    prompts = random_prompts([21, 13], ref.config.vocab_size, seed=4)
    with LLM(model=str(tmp_path), kv_cache_dtype="bfloat16", **BASE) as llm:
        to_rounded, to_plain = _gaps(llm, [rounded, ref], prompts)
    print(f"gemma2, bfloat16 pool: gap to the rounded reference {to_rounded:.2e}, to float32 {to_plain:.2e}")
    assert to_rounded < 1e-4 and to_plain > 10 * to_rounded


def test_a_bfloat16_pool_holds_twice_the_pages_in_the_same_bytes(llama):
    path = llama[0]
    budget = dict(BASE, max_model_len=4096, max_num_seqs=64, cpu_kv_cache_bytes=1 << 20)
    with LLM(model=path, **budget) as wide, LLM(model=path, kv_cache_dtype="bfloat16", **budget) as narrow:
        assert narrow.engine.pages.num_pages == 2 * wide.engine.pages.num_pages
        assert narrow.memory_stats()["kv_bytes"] == wide.memory_stats()["kv_bytes"] <= 1 << 20


def test_auto_resolves_to_bfloat16_only_for_a_float32_model_in_the_cpu_int4_form():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert kv_cache_dtype("auto", cpu, torch.float32, True) == torch.bfloat16
    assert kv_cache_dtype("auto", cpu, torch.float32, False) == torch.float32
    assert kv_cache_dtype("auto", cpu, torch.float16, True) == torch.float16  # no bytes to save
    assert kv_cache_dtype("auto", cuda, torch.bfloat16, False) == torch.bfloat16
    assert kv_cache_dtype("float32", cpu, torch.float32, True) == torch.float32
    assert kv_cache_dtype("bfloat16", cuda, torch.bfloat16, False) == torch.bfloat16
    with pytest.raises(InvalidRequestError, match="kv_cache_dtype 'float32' differs .* needs device 'cpu'"):
        kv_cache_dtype("float32", cuda, torch.bfloat16, False)


def test_a_pool_dtype_other_than_the_models_is_refused_on_cuda():
    with pytest.raises(ValueError, match="kv_cache_dtype 'bfloat16' differs from dtype 'float32'"):
        EngineConfig(device="cuda", dtype="float32", kv_cache_dtype="bfloat16")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int8")
    EngineConfig(device="cuda", dtype="bfloat16", kv_cache_dtype="bfloat16")
    EngineConfig(device="cuda", kv_cache_dtype="bfloat16")  # dtype auto: bfloat16 on CUDA, checked by the engine
    EngineConfig(device="cpu", dtype="float32", kv_cache_dtype="float16")
