"""The GPU checks of a new family (tests/gpu/test_gpu_<family>.py): a gentle tiny model in bf16 on the default GPU
path (FlashInfer, CUDA graphs, Triton kernels where the family allows them) against transformers' float32 and bf16
runs of the same weights, with the tolerances and reasons of tests/gpu/test_gpu_parity.py."""
from __future__ import annotations

import torch

from braidinfer import SamplingParams
from tests.conftest import build_tiny_model_from_config
from tests.support.numerics import assert_error_like_reference, assert_greedy_agreement

MAX_BF16_ERROR = 1.0
"""Nats: the most a bf16 logprob may be off the float32 model's (tests/gpu/test_gpu_parity.py)."""
MIN_FIRST_AGREEMENT = 0.5
"""Fraction of first greedy tokens that must equal the float32 model's (tests/gpu/test_gpu_parity.py)."""


def gentle_model_from_config(config, path, tokenizer, seed: int):
    """build_tiny_model_from_config's model with its inner 2-D weights at std 0.02 and norm weights in [0.5, 1.5]
    (test_gpu_parity.gentle_model's reasons), saved to `path`; returns the float32 transformers model."""
    model = build_tiny_model_from_config(config, path, tokenizer, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.sub_(0.5).mul_(1.0 / 3.5).add_(0.5)
            elif p.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name:
                p.mul_(0.2)
    model.save_pretrained(path)
    return model


def random_prompts(seed: int, lengths) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (n,), generator=g).tolist() for n in lengths]


def _logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids], device="cuda")).logits[0].float(), -1)


def _greedy(model, prompt, n=32):
    out = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def check_logprobs(llm, ref32, ref16, prompts) -> None:
    """Our bf16 top-5 logprobs are off the float32 model's by about transformers' own bf16 error, at most
    MAX_BF16_ERROR."""
    for prompt in prompts:
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True))[0]
        exact, hf16 = _logprobs(ref32, prompt + out.token_ids), _logprobs(ref16, prompt + out.token_ids)
        ours = hf = 0.0
        for step, lp in enumerate(out.logprobs):
            row = len(prompt) - 1 + step
            for token, value in lp.top:
                ours = max(ours, abs(value - exact[row, token].item()))
                hf = max(hf, abs(hf16[row, token].item() - exact[row, token].item()))
        print(f"prompt {len(prompt)}: bf16 error vs fp32 {ours:.3f}, transformers' {hf:.3f}")
        assert_error_like_reference(ours, hf, MAX_BF16_ERROR)


def check_greedy(llm, ref32, ref16, prompts) -> None:
    """Batched bf16 greedy continuations agree with the float32 model about as long as transformers' bf16 ones."""
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ours = [o.token_ids for o in llm.generate(prompts, params)]
    exact = [_greedy(ref32, p) for p in prompts]
    hf16 = [_greedy(ref16, p) for p in prompts]
    assert_greedy_agreement(ours, hf16, exact, MIN_FIRST_AGREEMENT)
