"""ERNIE-4.5 dense against transformers: RoPE on interleaved pairs in float32 (q/k rows reordered at load), tied
embeddings, and every projection biased (use_bias) so that each bias is checked."""
from __future__ import annotations

import pytest

from braidinfer import LLM
from tests.conftest import build_tiny_model_from_config
from tests.support.family_parity import assert_greedy_matches, assert_logprobs_match, random_prompts
from tests.support.gguf_export import write_gguf
from tests.support.tiny_checkpoints import randomize_biases

SHAPE = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True)


@pytest.fixture(scope="module", params=[True, False], ids=["use_bias", "no_bias"])
def ernie(request, tmp_path_factory, smollm_tokenizer):
    import transformers

    path = tmp_path_factory.mktemp("tiny-ernie4_5")
    config = transformers.Ernie4_5Config(**SHAPE, use_bias=request.param)
    ref = build_tiny_model_from_config(config, path, smollm_tokenizer, seed=5)
    randomize_biases(ref, path, seed=5)
    llm = LLM(model=str(path), device="cpu", dtype="float32", page_size=4, max_num_batched_tokens=32, progress=False)
    yield llm, ref
    llm.close()


def test_logprobs_match_transformers(ernie):
    llm, ref = ernie
    assert_logprobs_match(llm, ref, random_prompts([40], 49152, seed=0)[0])


def test_greedy_matches_alone_and_batched(ernie):
    llm, ref = ernie
    assert_greedy_matches(llm, ref, random_prompts([5, 17, 38], 49152, seed=1))


def test_gguf_with_a_tokenizer_serves_like_transformers(ernie, embedded_gguf, smollm_tokenizer, tmp_path):
    """transformers reads no ernie4_5 GGUF: the engine still builds the file's tokenizer (here the embedded model's
    vocabulary, copied into the file as llama.cpp's converter would write ERNIE's), encodes and applies the chat
    template as transformers' own conversion of that vocabulary does, and decodes like transformers' model."""
    _, ref = ernie
    path = tmp_path / "tiny-ernie4_5.F32.gguf"
    write_gguf(ref, path, "ernie4_5", tokenizer_from=embedded_gguf)
    with LLM(model=str(path), device="cpu", dtype="float32", page_size=4, progress=False) as llm:
        messages = [{"role": "user", "content": "Über naïve   spaces, <b>tags</b> & 123 digits?"}]
        assert llm.tokenizer.encode(messages[0]["content"]) == smollm_tokenizer.encode(messages[0]["content"])
        ours = llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours == smollm_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert llm.tokenizer.eos_token_id == smollm_tokenizer.eos_token_id
        assert_greedy_matches(llm, ref, random_prompts([9, 21], 49152, seed=2), steps=12)
