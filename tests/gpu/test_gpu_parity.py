"""The same engine code path on CUDA in bf16: logprobs within bf16 tolerance of transformers, greedy tokens agree."""
from __future__ import annotations

import pytest
import torch

from braidinfer import LLM, SamplingParams
from tests.conftest import build_tiny_model

pytestmark = pytest.mark.gpu

SHAPES = {
    "llama": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
                  num_key_value_heads=3),  # SmolLM2-135M's head layout
    "qwen3": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128),  # Qwen3-0.6B's head layout
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def pair(request, tmp_path_factory, smollm_tokenizer):
    arch = request.param
    path = tmp_path_factory.mktemp(f"gpu-{arch}")
    ref = build_tiny_model(arch, path, smollm_tokenizer, seed=11, **SHAPES[arch])
    ref = ref.to("cuda", torch.bfloat16)
    llm = LLM(model=str(path), device="cuda", dtype="bfloat16", num_kv_pages=4096, progress=False)
    yield llm, ref
    llm.close()


def _prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (7, 31, 64, 129, 300, 513)]


def test_logprobs_within_bf16_tolerance(pair):
    llm, ref = pair
    for prompt in _prompts()[:3]:
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True))[0]
        with torch.no_grad():
            ref_lp = torch.log_softmax(ref(torch.tensor([prompt + out.token_ids], device="cuda")).logits[0].float(), -1)
        for step, lp in enumerate(out.logprobs):
            row = ref_lp[len(prompt) - 1 + step]
            for token, value in lp.top:
                assert value == pytest.approx(row[token].item(), abs=0.1)


def test_greedy_tokens_agree_on_most_prompts(pair):
    llm, ref = pair
    prompts = _prompts(seed=1)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ours = [o.token_ids for o in llm.generate(prompts, params)]
    same = 0
    for prompt, got in zip(prompts, ours):
        hf = ref.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=32, min_new_tokens=32,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
        same += got == hf[0, len(prompt):].tolist()
    assert same >= len(prompts) - 1, f"only {same}/{len(prompts)} prompts gave identical greedy tokens"
