"""Gemma 3 (text) against transformers: a tiny random checkpoint (float32, CPU) with QK-norm, a sliding window of 8
on local layers, local and global layers rotating with different bases (the global one linearly scaled), and
prompts several windows long prefilled in chunks over pages of 4 tokens. Also the per-layer key shift of composed
prompts against transformers' own rotation."""
from __future__ import annotations

import pytest
import torch

from braidinfer import LLM
from braidinfer.models.config import ModelConfig
from braidinfer.models.gemma3 import Gemma3ForCausalLM
from tests.conftest import build_tiny_model_from_config
from tests.support.family_parity import assert_greedy_matches, assert_logprobs_match, random_prompts

WINDOW = 8


def gemma3_config():
    from transformers import Gemma3TextConfig

    # Pattern 2 (local, global, local) so three layers hold both kinds; bases far apart so a swap would show.
    return Gemma3TextConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                            sliding_window=WINDOW, sliding_window_pattern=2, rope_theta=50_000.0,
                            rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
                            max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                            attn_implementation="eager")


@pytest.fixture(scope="module")
def engine(tmp_path_factory, smollm_tokenizer):
    path = tmp_path_factory.mktemp("tiny-gemma3")
    ref = build_tiny_model_from_config(gemma3_config(), path, smollm_tokenizer)
    llm = LLM(model=str(path), device="cpu", dtype="float32", page_size=4, max_num_batched_tokens=32, progress=False)
    yield llm, ref
    llm.close()


def test_prefill_and_decode_logprobs_match_transformers(engine):
    llm, ref = engine
    assert_logprobs_match(llm, ref, random_prompts([40], 49152)[0])


def test_greedy_continuations_match_alone_and_in_mixed_batches(engine):
    llm, ref = engine
    assert_greedy_matches(llm, ref, random_prompts([5, 17, 40, 61], 49152, seed=1))


def _meta_model(config) -> Gemma3ForCausalLM:
    with torch.device("meta"):
        return Gemma3ForCausalLM(ModelConfig.from_hf_config(config.to_dict()))


def test_attention_specs_follow_the_config():
    specs = _meta_model(gemma3_config()).attention_specs()
    assert [s.sliding_window for s in specs] == [WINDOW, None, WINDOW]
    assert {(s.scale, s.logits_soft_cap) for s in specs} == {(24**-0.5, None)}


def test_published_config_keys_give_the_same_layers():
    # Published config.json files (transformers 4.5x) give sliding_window_pattern, rope_local_base_freq and
    # rope_scaling instead of layer_types and per-kind rope_parameters.
    hf = gemma3_config().to_dict()
    published = {k: v for k, v in hf.items() if k not in ("layer_types", "rope_parameters")}
    published.update(rope_theta=50_000.0, rope_local_base_freq=100.0, sliding_window_pattern=2,
                     rope_scaling={"rope_type": "linear", "factor": 4.0})
    with torch.device("meta"):
        old = Gemma3ForCausalLM(ModelConfig.from_hf_config(published))
    new = _meta_model(gemma3_config())
    assert old.model.layer_types == new.model.layer_types == ["sliding_attention", "full_attention",
                                                              "sliding_attention"]
    for kind in ("sliding_attention", "full_attention"):
        torch.testing.assert_close(old.model.rotary_embs[kind].inv_freq, new.model.rotary_embs[kind].inv_freq)


def test_shift_keys_rotates_each_layer_by_its_own_base():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding, apply_rotary_pos_emb

    config = gemma3_config()
    hf_rope = Gemma3RotaryEmbedding(config)
    model = Gemma3ForCausalLM(ModelConfig.from_hf_config(config.to_dict()))
    n, delta = 6, 11
    raw = torch.randn(n, 3, 2, 16)  # (tokens, layers, kv_heads, head_dim), not rotated yet

    def hf_rotate(positions):
        out = torch.empty_like(raw)
        for layer, kind in enumerate(config.layer_types):
            cos, sin = hf_rope(raw, torch.tensor([positions]), kind)  # (1, n, hd)
            k = raw[:, layer].transpose(0, 1)[None]  # (1, kv_heads, n, hd)
            out[:, layer] = apply_rotary_pos_emb(k, k, cos, sin)[1][0].transpose(0, 1)
        return out

    shifted = model.shift_keys(hf_rotate(list(range(n))), delta)
    torch.testing.assert_close(shifted, hf_rotate(list(range(delta, delta + n))), rtol=1e-5, atol=1e-5)
