"""Sampler: greedy, seeded reproducibility, the filtered distributions it draws from, logprobs, and bf16 logits (the
model's dtype on CUDA) sampled as their float32 copy would be."""

import math
from types import SimpleNamespace

import pytest
import torch

from braidinfer.sampling.logits import sample_batch
from braidinfer.sampling.sampler import Sampler, make_generator
from braidinfer.sampling_params import SamplingParams

# Distinct logits with no ties, so every top-k / top-p / min-p boundary is unambiguous.
LOGITS = [2.0, 1.5, 1.1, 0.4, 0.0, -0.6, -1.3, -3.0]


def reference_probs(logits, temperature, top_k, top_p, min_p):
    """The distribution the sampler should draw from, computed with plain Python loops."""
    scaled = [x / temperature for x in logits]
    peak = max(scaled)
    weights = [math.exp(x - peak) for x in scaled]
    probs = [w / sum(weights) for w in weights]
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept = order[:top_k] if top_k > 0 else order
    kept_mass = sum(probs[i] for i in kept)
    nucleus, mass = [], 0.0
    for i in kept:  # smallest prefix whose renormalised mass reaches top_p
        nucleus.append(i)
        mass += probs[i] / kept_mass
        if mass >= top_p:
            break
    final = [i for i in nucleus if probs[i] >= min_p * probs[order[0]]]
    total = sum(probs[i] for i in final)
    return [probs[i] / total if i in final else 0.0 for i in range(len(probs))]


def sample(logits, params, generators):
    return Sampler()(logits, params, generators)


def test_reference_is_not_trivial():
    # Guards the distribution tests: each filter must actually remove something here.
    assert sum(p > 0 for p in reference_probs(LOGITS, 1.0, 3, 1.0, 0.0)) == 3
    assert sum(p > 0 for p in reference_probs(LOGITS, 1.0, 0, 0.8, 0.0)) == 3
    assert sum(p > 0 for p in reference_probs(LOGITS, 1.0, 0, 1.0, 0.3)) == 3
    # All three together: top-k keeps 6, top-p 5 of those, min-p 4 of those.
    assert sum(p > 0 for p in reference_probs(LOGITS, 1.3, 6, 1.0, 0.0)) == 6
    assert sum(p > 0 for p in reference_probs(LOGITS, 1.3, 6, 0.9, 0.0)) == 5
    assert sum(p > 0 for p in reference_probs(LOGITS, 1.3, 6, 0.9, 0.25)) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_is_argmax(dtype):
    logits = torch.randn(16, 1000, generator=torch.Generator().manual_seed(0)).to(dtype)
    params = [SamplingParams(temperature=0)] * 16
    out = sample(logits, params, [make_generator(1, "cpu")] * 16)
    expected = [max(range(1000), key=lambda j: row[j]) for row in logits.float().tolist()]
    assert out.token_ids.dtype == torch.int64
    assert out.token_ids.tolist() == expected


@pytest.mark.parametrize("temperature", [0.05, 1.0, 7.0, 100.0])
def test_top_k_one_is_argmax_at_any_temperature(temperature):
    logits = torch.randn(64, 500, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=temperature, top_k=1)] * 64
    out = sample(logits, params, [make_generator(2, "cpu")] * 64)
    assert out.token_ids.tolist() == logits.argmax(dim=-1).tolist()


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = torch.zeros(64, 1000)  # uniform: every draw is decided by the noise alone
    params = [SamplingParams(seed=7)] * 64

    def run(seed):
        return sample(logits, params, [make_generator(seed, "cpu") for _ in range(64)]).token_ids.tolist()

    first = run(7)
    assert run(7) == first
    assert run(8) != first
    # Each row has its own generator with the same seed, so every row draws the same token.
    assert len(set(first)) == 1


def test_seeded_row_does_not_depend_on_its_batch():
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(3))
    seeded = SamplingParams(seed=11)
    alone = sample(logits[2:3], [seeded], [make_generator(11, "cpu")]).token_ids.item()
    shared = make_generator(0, "cpu")
    params = [SamplingParams(), SamplingParams(temperature=0), seeded, SamplingParams(), SamplingParams()]
    generators = [shared, shared, make_generator(11, "cpu"), shared, shared]
    assert sample(logits, params, generators).token_ids[2].item() == alone


def assert_matches(token_ids, expected):
    n = len(token_ids)
    counts = torch.bincount(token_ids, minlength=len(expected)).tolist()
    for token, (count, p) in enumerate(zip(counts, expected)):
        if p == 0.0:
            assert count == 0, f"token {token} was filtered out but drawn {count} times"
        else:
            assert abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1, (token, count, n * p)


@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p",
    [
        (1.0, 0, 1.0, 0.0),
        (0.7, 3, 1.0, 0.0),
        (1.0, 0, 0.8, 0.0),
        (1.3, 0, 1.0, 0.2),
        (0.9, 5, 0.9, 0.05),
        (1.3, 6, 0.9, 0.25),
        (2.0, -1, 0.6, 0.0),
    ],
)
def test_empirical_distribution_matches_reference(temperature, top_k, top_p, min_p):
    n = 20_000
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    logits = torch.tensor([LOGITS]).repeat(n, 1)
    tokens = sample(logits, [params] * n, [make_generator(1234, "cpu")] * n).token_ids
    assert_matches(tokens, reference_probs(LOGITS, temperature, top_k, top_p, min_p))


@pytest.mark.parametrize(
    "configs",
    [
        # top-k rows next to unfiltered rows (the unfiltered ones must still reach every token)
        [(0.9, 3, 1.0, 0.0), (1.0, 0, 1.0, 0.0)],
        # a top-p row without top-k next to top-k and unfiltered rows
        [(0.9, 3, 1.0, 0.0), (1.0, 0, 1.0, 0.0), (1.0, 0, 0.8, 0.0), (1.2, 2, 0.9, 0.3)],
    ],
)
def test_rows_with_different_filters_in_one_batch(configs):
    n = 8_000
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m) for t, k, p, m in configs]
    batch = [params[i % len(params)] for i in range(n * len(params))]
    logits = torch.tensor([LOGITS]).repeat(len(batch), 1)
    tokens = sample(logits, batch, [make_generator(99, "cpu")] * len(batch)).token_ids
    for i, config in enumerate(configs):
        assert_matches(tokens[i :: len(configs)], reference_probs(LOGITS, *config))


def test_empirical_distribution_with_per_row_generators():
    n = 5_000
    params = [SamplingParams(temperature=0.8, top_k=4, top_p=0.95, seed=i) for i in range(n)]
    logits = torch.tensor([LOGITS]).repeat(n, 1)
    tokens = sample(logits, params, [make_generator(i, "cpu") for i in range(n)]).token_ids
    assert_matches(tokens, reference_probs(LOGITS, 0.8, 4, 0.95, 0.0))


@pytest.mark.parametrize("top_k", [900, 3000])  # below and above the partial-selection limit
def test_large_top_k_draws_from_exactly_the_top_k(top_k):
    vocab, n = 4096, 400
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(10))
    params = [SamplingParams(temperature=1000.0, top_k=top_k)] * n  # nearly uniform over the top k
    tokens = sample(logits, params, [make_generator(3, "cpu")] * n).token_ids.tolist()
    ranks = [sorted(range(vocab), key=lambda j, r=row: -r[j]).index(t) for row, t in zip(logits.tolist(), tokens)]
    assert max(ranks) < top_k
    assert max(ranks) > 0.9 * top_k


@pytest.mark.parametrize("top_p", [1e-6, 1e-46, 1e-300])  # the last two round to 0 in float32
def test_tiny_top_p_keeps_only_the_best_token(top_p):
    logits = torch.randn(200, 50, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(temperature=3.0, top_p=top_p)] * 200
    out = sample(logits, params, [make_generator(0, "cpu")] * 200)
    assert out.token_ids.tolist() == logits.argmax(dim=-1).tolist()


def test_min_p_one_keeps_only_the_best_token():
    logits = torch.randn(200, 50, generator=torch.Generator().manual_seed(6))
    params = [SamplingParams(temperature=5.0, min_p=1.0)] * 200
    out = sample(logits, params, [make_generator(0, "cpu")] * 200)
    assert out.token_ids.tolist() == logits.argmax(dim=-1).tolist()


def test_logprobs_are_of_the_raw_distribution():
    # Distinct multiples of 1/4, exact in bfloat16, so the top-n order has no ties.
    rows = [torch.randperm(64, generator=torch.Generator().manual_seed(r)) for r in range(4)]
    logits = (torch.stack(rows).float() / 4 - 8).to(torch.bfloat16)
    params = [
        SamplingParams(temperature=0, logprobs=5),
        SamplingParams(temperature=0.5, top_k=3, logprobs=2),
        SamplingParams(logprobs=None),
        SamplingParams(temperature=1.5, min_p=0.1, logprobs=0),
    ]
    out = sample(logits, params, [make_generator(9, "cpu")] * 4)
    assert out.logprobs[2] is None
    for row, p in enumerate(params):
        if p.logprobs is None:
            continue
        values = logits[row].double().tolist()
        log_total = math.log(sum(math.exp(v) for v in values))
        reference = [v - log_total for v in values]
        entry = out.logprobs[row]
        assert entry.token_id == out.token_ids[row].item()
        assert entry.logprob == pytest.approx(reference[entry.token_id], abs=1e-4)
        best = sorted(range(64), key=lambda j: -reference[j])[: p.logprobs]
        assert [token for token, _ in entry.top] == best
        assert [lp for _, lp in entry.top] == pytest.approx([reference[j] for j in best], abs=1e-4)
        assert all(a >= b for (_, a), (_, b) in zip(entry.top, entry.top[1:]))


def test_logprobs_off_everywhere():
    out = sample(torch.randn(3, 10), [SamplingParams()] * 3, [make_generator(0, "cpu")] * 3)
    assert out.logprobs == [None, None, None]


def test_mixed_greedy_and_sampled_rows():
    logits = torch.randn(6, 200, generator=torch.Generator().manual_seed(8))
    greedy, top2 = SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=2)
    params = [greedy, top2, greedy, top2, top2, greedy]
    shared = make_generator(4, "cpu")
    seen = {row: set() for row in range(6)}
    for _ in range(50):
        for row, token in enumerate(sample(logits, params, [shared] * 6).token_ids.tolist()):
            seen[row].add(token)
    for row, p in enumerate(params):
        ranked = sorted(range(200), key=lambda j: -logits[row, j].item())
        if p.greedy:
            assert seen[row] == {ranked[0]}
        else:
            assert seen[row] <= set(ranked[:2])
    # Over 50 draws each sampled row should have shown both of its two tokens at least once.
    assert any(len(seen[row]) == 2 for row in (1, 3, 4))


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError):
        sample(torch.randn(3, 10), [SamplingParams()] * 2, [make_generator(0, "cpu")] * 3)


def test_make_generator_accepts_negative_seeds():
    a = torch.rand(4, generator=make_generator(-1, "cpu"))
    b = torch.rand(4, generator=make_generator(-1, "cpu"))
    assert torch.equal(a, b)


def first_max(row: list[float]) -> int:
    return max(range(len(row)), key=lambda j: row[j])


def test_greedy_bf16_logits_give_the_tokens_of_their_float32_copy():
    """An all-greedy batch takes the argmax of the logits as they are: the tokens of their exact float32 copy, the
    first of tied maxima included (small integers, and values near 20 rounded to bf16's 1/8 steps, tie often)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.cat([torch.randint(-3, 4, (4, 500), generator=g).float(),
                        20 + torch.randn(4, 500, generator=g) / 8]).to(torch.bfloat16)
    out = sample(logits, [SamplingParams(temperature=0)] * 8, [make_generator(0, "cpu")] * 8)
    assert out.token_ids.dtype == torch.int64
    assert out.token_ids.tolist() == [first_max(row) for row in logits.float().tolist()]
    assert out.logprobs == [None] * 8


def test_logprobs_of_bf16_logits_are_computed_in_float32():
    """A row that wants logprobs sends the batch through the float32 copy: the logprobs are log_softmax of that copy,
    bit for bit (log_softmax in bf16 would be off by its rounding)."""
    g = torch.Generator().manual_seed(4)
    logits = (20 + torch.randn(2, 300, generator=g) / 8).to(torch.bfloat16)
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0)]
    out = sample(logits, params, [make_generator(0, "cpu")] * 2)
    expected = torch.log_softmax(logits.float(), dim=-1)
    assert out.token_ids.tolist() == [first_max(row) for row in logits.float().tolist()]
    entry = out.logprobs[0]
    assert entry.logprob == expected[0, entry.token_id].item()
    assert [lp for _, lp in entry.top] == expected[0].topk(3).values.tolist()
    assert abs(torch.log_softmax(logits, dim=-1)[0, entry.token_id].item() - entry.logprob) > 1e-3  # not trivial
    assert out.logprobs[1] is None


def test_engine_penalises_bf16_logits_in_float32():
    """Token 1 (256) was generated; a presence penalty of 0.6 leaves it at 255.4 in float32, above token 0 (255).
    In bf16 (steps of 1 there) it would round to 255 and tie, and token 0 would win. The runner's logits stay as
    they were."""
    seq = SimpleNamespace(params=SamplingParams(temperature=0, presence_penalty=0.6), token_ids=[5, 1],
                          num_prompt_tokens=1, matcher=None, generator=make_generator(0, "cpu"))
    logits = torch.full((1, 8), -4.0, dtype=torch.bfloat16)
    logits[0, :2] = torch.tensor([255.0, 256.0])
    before = logits.clone()
    out = sample_batch(Sampler(), logits, [seq])
    assert out.seqs == [seq] and out.token_ids.tolist() == [1] and not out.failed
    assert torch.equal(logits, before)


@pytest.mark.parametrize("greedy_rows", [(), (0, 3)])
def test_rows_sharing_a_generator_draw_one_block(greedy_rows):
    """The sampled rows that share one generator take one [rows, vocab] block of Exp(1) noise from it, in row
    order: their tokens are argmax(p / E) with E = -log(U) of a block of uniforms (raised to the smallest normal
    float) drawn from an identically seeded generator (every row sampled, or some greedy between them)."""
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    params = [SamplingParams(temperature=0.0 if i in greedy_rows else 0.7) for i in range(6)]
    out = sample(logits, params, [make_generator(3, "cpu")] * 6)
    sampled = [i for i in range(6) if i not in greedy_rows]
    expected = logits.argmax(dim=-1)
    expected[sampled] = _race(logits[sampled], _noise(len(sampled), 50, 3))
    assert out.token_ids.tolist() == expected.tolist()


def test_rows_of_a_shared_generator_between_seeded_rows_take_their_block_in_order():
    """Rows 0, 2 and 4 share a generator, rows 1 and 3 have their own: each group draws its block in row order
    (the shared rows' block scattered to their rows), whatever the other rows draw."""
    torch.manual_seed(1)
    logits = torch.randn(5, 40)
    shared = make_generator(5, "cpu")
    generators = [shared, make_generator(6, "cpu"), shared, make_generator(7, "cpu"), shared]
    out = sample(logits, [SamplingParams(temperature=0.7)] * 5, generators)
    expected = torch.empty(5, dtype=torch.int64)
    expected[[0, 2, 4]] = _race(logits[[0, 2, 4]], _noise(3, 40, 5))
    expected[1] = _race(logits[1:2], _noise(1, 40, 6))[0]
    expected[3] = _race(logits[3:4], _noise(1, 40, 7))[0]
    assert out.token_ids.tolist() == expected.tolist()


def test_a_single_surviving_token_is_drawn_even_when_a_uniform_is_zero(monkeypatch):
    """A uniform draw of exactly 0 (2**-24 per float32 draw) must not make the one token top-k kept lose to a
    removed one."""
    logits = torch.tensor([[0.0, 5.0, 1.0, -2.0]])
    monkeypatch.setattr(torch.Tensor, "uniform_", lambda self, generator=None: self.zero_())
    out = sample(logits, [SamplingParams(temperature=0.7, top_k=1)], [make_generator(0, "cpu")])
    assert out.token_ids.tolist() == [1]


def _noise(rows: int, vocab: int, seed: int) -> torch.Tensor:
    u = torch.empty(rows, vocab).uniform_(generator=make_generator(seed, "cpu"))
    return -u.clamp_min(torch.finfo(torch.float32).tiny).log()


def _race(logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return (torch.softmax(logits / 0.7, dim=-1) / noise).argmax(dim=-1)


@pytest.mark.parametrize("spread", [8.0, 0.01])  # a peaked row (nucleus of a few tokens), a near-flat one (thousands)
@pytest.mark.parametrize("top_k", [0, 40])
def test_top_p_over_a_large_vocabulary_keeps_the_reference_nucleus(spread, top_k):
    """With more tokens than the CPU's first try looks at (1,024 most likely), the kept tokens and their
    probabilities are the reference's: a peaked row's nucleus is found among them, a near-flat row's reaches past
    them and takes the full sort."""
    from braidinfer.sampling.sampler import _filtered_probs

    logits = torch.randn(3000, generator=torch.Generator().manual_seed(4)) * spread
    params = SamplingParams(temperature=0.9, top_p=0.8, top_k=top_k)
    probs = _filtered_probs(logits.unsqueeze(0), [params])[0]
    expected = torch.tensor(reference_probs(logits.tolist(), 0.9, top_k, 0.8, 0.0), dtype=torch.float32)
    assert torch.equal(probs > 0, expected > 0)
    assert torch.allclose(probs, expected, atol=1e-6)
    kept = int((expected > 0).sum())
    assert (kept < 1024) if spread > 1 or top_k else (kept > 1024)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_pass_argmax_is_argmax_with_ties(dtype):
    """The greedy path's two-pass argmax (CUDA's, computed here on the CPU) picks the first of tied maxima, in the
    first chunk holding one and the first place in it, as argmax does: few distinct values make ties common."""
    from braidinfer.sampling.sampler import ARGMAX_CHUNK, two_pass_argmax

    g = torch.Generator().manual_seed(3)
    logits = torch.randint(-4, 5, (32, 501 * ARGMAX_CHUNK), generator=g).to(dtype)
    logits[0] = 0.0  # every entry tied: id 0
    logits[1, -1] = 9.0  # the single largest at the last id
    logits[2, [ARGMAX_CHUNK - 1, ARGMAX_CHUNK, 5 * ARGMAX_CHUNK]] = 9.0  # tied across chunks: the first wins
    got = two_pass_argmax(logits)
    assert got.tolist() == logits.argmax(dim=-1).tolist()
    assert got[:3].tolist() == [0, 501 * ARGMAX_CHUNK - 1, ARGMAX_CHUNK - 1]


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("path", ["partial", "sorted"])
def test_top_k_keeps_the_tokens_tied_with_the_kth_as_transformers_does(top_k, path):
    """Ties with the k-th largest logit stay in (transformers' TopKLogitsWarper: logits below the k-th value go), so
    top_k=1 draws among the argmax ties; compared on rows with ties at and around the k-th place, from the partial
    top-k selection and from the full sort (forced by a row in the batch keeping more than 1024 tokens)."""
    from transformers.generation.logits_process import TopKLogitsWarper

    from braidinfer.sampling.sampler import _filtered_probs

    logits = torch.randn(6, 2048, generator=torch.Generator().manual_seed(4))
    logits[:, :3] = 5.0  # a three-way tie at the top
    logits[3:, 3:5] = 4.0  # and in rows 3-5 a tie just below it
    params = [SamplingParams(temperature=1.0, top_k=top_k)] * 6
    wide = [SamplingParams(temperature=1.0, top_k=1500)] if path == "sorted" else []
    rows = torch.cat([logits, logits[:1]]) if wide else logits
    kept = _filtered_probs(rows.clone(), params + wide)[:6] > 0
    expected = TopKLogitsWarper(top_k)(None, logits.clone()) > float("-inf")
    assert torch.equal(kept, expected)
    assert kept[:, :3].all() and kept.sum().item() == 18  # the whole top tie, nothing else
    draws = sample(logits.repeat(100, 1), params * 100, [make_generator(5, "cpu")] * 600).token_ids.tolist()
    assert set(draws) == {0, 1, 2}


@pytest.mark.parametrize("temperature", [1e39, 1e300])
def test_temperatures_beyond_float32_draw_only_allowed_tokens(temperature):
    """A temperature float32 cannot hold (infinite there) would make a forbidden token's -inf logit NaN, and the whole
    row NaN; sampling takes it as 1e6, so draws are nearly uniform over the allowed tokens and never others."""
    from braidinfer.sampling.sampler import _filtered_probs

    logits = torch.randn(200, 50, generator=torch.Generator().manual_seed(7))
    logits[:, 10:] = float("-inf")  # a grammar allows tokens 0-9 only
    params = [SamplingParams(temperature=temperature)] * 200
    probs = _filtered_probs(logits.clone(), params)
    assert torch.allclose(probs[:, :10], torch.full((200, 10), 0.1)) and not probs[:, 10:].any()
    assert set(sample(logits, params, [make_generator(8, "cpu")] * 200).token_ids.tolist()) == set(range(10))


def test_logprobs_are_of_the_logits_before_penalties_and_grammar_masks(monkeypatch):
    """As vLLM reports them: the model's distribution, not the penalised or grammar-masked one (which would list
    forbidden tokens at -inf). The token is still chosen from the penalised, masked logits."""
    class OnlyTokens:  # a grammar allowing tokens 4 and 5 (its masks written by `masks` below)
        pass

    values = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0]])
    seq = SimpleNamespace(params=SamplingParams(temperature=0, repetition_penalty=4.0, logprobs=3), token_ids=[0],
                          num_prompt_tokens=1, matcher=OnlyTokens(), generator=make_generator(0, "cpu"))
    def masks(logits, matchers):
        assert matchers == [seq.matcher]
        logits[:, [0, 1, 2, 3, 6, 7]] = float("-inf")

    monkeypatch.setattr("braidinfer.sampling.logits.apply_token_masks", masks)
    out = sample_batch(Sampler(), values.clone(), [seq])
    reference = torch.log_softmax(values.double(), dim=-1)[0].tolist()
    (entry,) = out.logprobs
    assert out.token_ids.tolist() == [4] and entry.token_id == 4  # the best allowed token
    assert entry.logprob == pytest.approx(reference[4], abs=1e-5)
    assert [t for t, _ in entry.top] == [0, 1, 2]
    assert [lp for _, lp in entry.top] == pytest.approx(reference[:3], abs=1e-5)
