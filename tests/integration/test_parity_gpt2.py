"""GPT-2 against transformers: learned positions, LayerNorm with biases, Conv1D weights, tied head, no rotary."""
from __future__ import annotations

import pytest

from braidinfer import LLM
from tests.conftest import build_tiny_model_from_config
from tests.support.family_parity import assert_greedy_matches, assert_logprobs_match, random_prompts

VOCAB = 49152


def _config(**kw):
    import transformers

    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                   bos_token_id=1, eos_token_id=2, **kw)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, smollm_tokenizer):
    path = tmp_path_factory.mktemp("tiny-gpt2")
    ref = build_tiny_model_from_config(_config(), path, smollm_tokenizer, seed=5)
    return str(path), ref


def _llm(path: str, **kw) -> LLM:
    return LLM(model=path, device="cpu", dtype="float32", page_size=4, max_num_batched_tokens=32, progress=False, **kw)


def test_logprobs_and_greedy_match_transformers(gpt2):
    path, ref = gpt2
    with _llm(path) as llm:
        assert_logprobs_match(llm, ref, random_prompts([40], VOCAB, seed=1)[0])
        assert_greedy_matches(llm, ref, random_prompts([5, 19, 50], VOCAB, seed=2))


def test_context_is_bounded_by_the_learned_positions(gpt2):
    path, _ = gpt2
    with _llm(path, max_model_len=1000) as llm:
        assert llm.engine.max_model_len == 128


def test_scale_by_inverse_layer_idx(tmp_path, smollm_tokenizer):
    # GPT-2 variants (e.g. Mistral's Stanford GPT-2s) divide each layer's scores by layer_idx + 1.
    ref = build_tiny_model_from_config(_config(scale_attn_by_inverse_layer_idx=True), tmp_path, smollm_tokenizer,
                                       seed=6)
    with _llm(str(tmp_path)) as llm:
        assert_logprobs_match(llm, ref, random_prompts([30], VOCAB, seed=3)[0])


def test_original_checkpoint_names_and_mask_buffers(gpt2, tmp_path):
    # The OpenAI conversion on the Hub names tensors without "transformer." and saves the causal-mask buffers.
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    path, ref = gpt2
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    weights = {k.removeprefix("transformer."): v for k, v in load_file(f"{path}/model.safetensors").items()}
    weights["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
    weights["h.1.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(weights, f"{tmp_path}/model.safetensors")
    with _llm(str(tmp_path)) as llm:
        assert_logprobs_match(llm, ref, random_prompts([12], VOCAB, seed=4)[0])


def test_composed_prompt_fails_clearly_and_the_engine_keeps_serving(gpt2):
    # A chunk's keys carry the learned positions it was computed at: they cannot move to another position.
    from braidinfer import SamplingParams
    from braidinfer.errors import UnsupportedModelError

    path, ref = gpt2
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with _llm(path) as llm:
        a, b = (llm.chunks.add(p, independent=True) for p in random_prompts([6, 9], VOCAB, seed=5))
        # A request running beside it is not taken down with it.
        bystander_prompt = random_prompts([14], VOCAB, seed=8)[0]
        bystander = llm.stream_deltas(bystander_prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
        first = next(bystander)
        with pytest.raises(UnsupportedModelError, match="learned"):
            llm.generate(random_prompts([3], VOCAB, seed=6)[0], params, chunks=[a, b])
        rest = list(bystander)
        assert rest[-1].finish_reason == "length" and rest[-1].error is None
        alone = llm.generate(bystander_prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
        assert first.token_ids + [t for d in rest for t in d.token_ids] == alone.token_ids
        assert_greedy_matches(llm, ref, random_prompts([10], VOCAB, seed=7), steps=4)
