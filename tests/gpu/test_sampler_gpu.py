"""The sampler on CUDA queues its work without synchronising the stream: with a blocking host-to-device copy the host
would wait there for the step's forward, and asynchronous scheduling could not queue the next step behind a sampled
one. PyTorch's sync debug mode turns every synchronising call into an error."""
from __future__ import annotations

import pytest
import torch

from braidinfer.sampling.sampler import Sampler, make_generator
from braidinfer.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

VOCAB = 1000


@pytest.fixture
def no_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _case(name: str):
    shared = torch.Generator(device="cuda")
    shared.manual_seed(0)
    sampled = SamplingParams(temperature=0.6)
    if name == "every row sampled":
        return [sampled] * 6, [shared] * 6
    if name == "greedy and sampled rows":
        return [sampled, SamplingParams(temperature=0.0), sampled, SamplingParams(temperature=0.0)], [shared] * 4
    if name == "seeded and shared generators":
        return [sampled] * 4, [shared, make_generator(1, "cuda"), shared, make_generator(2, "cuda")]
    filtered = [SamplingParams(temperature=0.8, top_k=20), SamplingParams(temperature=0.7, top_p=0.9),
                SamplingParams(temperature=1.0, min_p=0.05), SamplingParams(temperature=0.9, top_k=2000, top_p=0.5)]
    return filtered, [shared] * 4


@pytest.mark.parametrize("name", ["every row sampled", "greedy and sampled rows", "seeded and shared generators",
                                  "top-k, top-p and min-p"])
def test_sampling_does_not_synchronise(no_sync, name):
    params, generators = _case(name)
    logits = torch.randn(len(params), VOCAB, device="cuda", dtype=torch.bfloat16)
    out = Sampler()(logits, params, generators)
    torch.cuda.set_sync_debug_mode("default")
    tokens = out.token_ids.tolist()
    assert len(tokens) == len(params) and all(0 <= t < VOCAB for t in tokens)
    for row, p in enumerate(params):
        if p.greedy:
            assert tokens[row] == logits[row].float().argmax().item()


def test_greedy_ids_is_argmax_on_cuda_with_ties(no_sync):
    """Greedy rows take the two-pass argmax on CUDA (vocabularies of whole chunks): the same ids as torch's argmax,
    the first of tied maxima included, for Llama 3's and an indivisible vocabulary, without synchronising; batches
    above TWO_PASS_ARGMAX_MAX_ROWS take the one-pass argmax, with the same result."""
    from braidinfer.sampling.sampler import ARGMAX_CHUNK, TWO_PASS_ARGMAX_MAX_ROWS, greedy_ids

    for vocab, rows in ((128256, 8), (128256, TWO_PASS_ARGMAX_MAX_ROWS), (128256, 2 * TWO_PASS_ARGMAX_MAX_ROWS),
                        (1000, 8)):
        torch.cuda.set_sync_debug_mode("default")  # building the logits may synchronise (a host index list)
        g = torch.Generator(device="cuda")
        g.manual_seed(vocab + rows)
        logits = torch.randint(-4, 5, (rows, vocab), device="cuda", generator=g).to(torch.bfloat16)
        logits[1, [ARGMAX_CHUNK - 1, 3 * ARGMAX_CHUNK]] = 9.0
        torch.cuda.set_sync_debug_mode("error")
        got = greedy_ids(logits)
        torch.cuda.set_sync_debug_mode("default")
        assert got.tolist() == logits.argmax(dim=-1).tolist()
        assert got[1].item() == ARGMAX_CHUNK - 1
