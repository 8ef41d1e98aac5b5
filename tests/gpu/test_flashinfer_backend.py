"""The FlashInfer attention backend against the torch backend: kernel by kernel on random page pools, then end to
end."""
from __future__ import annotations

import copy

import pytest
import torch

from braidinfer import LLM, SamplingParams
from braidinfer.attention import AttentionMetadata, SeqSpan, TorchAttention
from braidinfer.attention.flashinfer_backend import TRITON_DECODE_MAX_ROWS, FlashInferAttention
from tests.gpu.test_gpu_parity import (
    MAX_BF16_ERROR,
    MIN_FIRST_AGREEMENT,
    NEEDS_FLASHINFER,
    SHAPES,
    _common_prefix,
    _errors,
    _greedy,
    _prompts,
    gentle_model,
)
from tests.support.numerics import (
    assert_attention_close,
    assert_error_like_reference,
    assert_greedy_agreement,
    max_logprob_gap,
)

pytestmark = [pytest.mark.gpu, NEEDS_FLASHINFER]

PAGE_SIZE = 16
HEADS = {"9q3kv-hd64": (9, 3, 64), "16q8kv-hd128": (16, 8, 128)}
# (q_len, context_len) per sequence; context_len - q_len tokens are already in the pool.
BATCHES = {
    "prefill-with-cached-prefix": [(37, 117), (100, 100), (5, 261)],
    "mixed": [(1, 300), (50, 83), (1, 17), (200, 200), (1, 1), (16, 48)],
    "decode-only": [(1, 1), (1, 16), (1, 17), (1, 500), (1, 1025)],
}


def _random_batch(spans_shape, num_kv_heads, head_dim, seed):
    """A page pool holding random cached KV, random non-overlapping page tables (one with a spare page at the end,
    as a table reserved ahead may have), and metadata for the new tokens as the runner builds it."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    need = [-(-ctx // PAGE_SIZE) + (i == 0) for i, (_, ctx) in enumerate(spans_shape)]
    num_pages = sum(need) + 7
    pool = torch.randn(1, num_pages, 2, num_kv_heads, PAGE_SIZE, head_dim, device="cuda", generator=g)
    order = torch.randperm(num_pages, device="cuda", generator=g)
    tables = list(order[: sum(need)].split(need))
    spans, slots, q_start = [], [], 0
    for (q_len, ctx), table in zip(spans_shape, tables):
        spans.append(SeqSpan(q_start, q_len, ctx, table))
        pos = torch.arange(ctx - q_len, ctx, device="cuda")
        slots.append(table[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE)
        q_start += q_len
    meta = AttentionMetadata(spans, torch.cat(slots), q_start)
    return pool, meta


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("heads", sorted(HEADS))
def test_kernels_match_torch_backend(batch, heads):
    num_qo, num_kv, hd = HEADS[heads]
    pool32, meta = _random_batch(BATCHES[batch], num_kv, hd, seed=sorted(BATCHES).index(batch))
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(meta.num_tokens, h, hd, device="cuda", generator=g) for h in (num_qo, num_kv, num_kv))
    # Both backends see the same bf16 values; the reference computes on them in fp32.
    q16, k16, v16, pool16 = (t.to(torch.bfloat16) for t in (q, k, v, pool32))
    ref_pool = pool16.float()
    ref = TorchAttention(ref_pool, hd**-0.5)(0, q16.float(), k16.float(), v16.float(), meta)
    fi = FlashInferAttention(pool16, hd**-0.5, num_qo)
    fi.plan(meta)
    out = fi(0, q16, k16, v16, meta)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert_attention_close(out, ref)
    # The new K/V landed in the same slots (an exact copy of bf16 values), nothing else changed.
    torch.testing.assert_close(pool16.float(), ref_pool, atol=0, rtol=0)


def test_run_without_plan_is_refused():
    pool, meta = _random_batch(BATCHES["mixed"], 8, 128, seed=0)
    fi = FlashInferAttention(pool.to(torch.bfloat16), 128**-0.5, 16)
    q = torch.zeros(meta.num_tokens, 16, 128, dtype=torch.bfloat16, device="cuda")
    kv = torch.zeros(meta.num_tokens, 8, 128, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="plan"):
        fi(0, q, kv, kv, meta)


# Rows' context lengths per graph-decode batch size: 1 and 4 attend with the Triton kernel, 16 with FlashInfer.
GRAPH_STEPS = {1: ([1], [700]), 4: ([1, 16, 17, 300], [1000, 2, 48, 33]),
               16: ([1 + 61 * i for i in range(16)], [16 * (i + 1) for i in range(16)])}


def _captured(dec, num_qo: int, hd: int):
    """(graph, q, out): `dec`'s attention captured once over one page per row; replays read q, write out."""
    b = dec.batch_size
    q = torch.zeros(b, num_qo, hd, dtype=torch.bfloat16, device="cuda")
    dec.plan(list(range(b + 1)), list(range(b)), [1] * b, positions=torch.zeros(b, device="cuda"))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        dec.attend(0, q, None)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = dec.attend(0, q, None)
    torch.cuda.current_stream().wait_stream(stream)
    return graph, q, out


def _replay_step(dec, captured, lengths, ref_backend, g) -> None:
    """Plans a step of rows with these context lengths on random pages, replays the captured graph on random
    queries, and compares with the torch backend."""
    graph, q, out = captured
    b, (_, num_qo, hd) = dec.batch_size, q.shape
    need = [-(-n // PAGE_SIZE) for n in lengths]
    pages = torch.randperm(ref_backend.kv_cache.shape[1], device="cuda", generator=g)[: sum(need)]
    tables = pages.split(need)
    indptr = torch.tensor([0, *need]).cumsum(0).tolist()
    last = [n - (p - 1) * PAGE_SIZE for n, p in zip(lengths, need)]
    dec.plan(indptr, pages.tolist(), last, positions=torch.tensor(lengths, device="cuda") - 1)
    q.copy_(torch.randn(b, num_qo, hd, device="cuda", generator=g))
    graph.replay()
    spans = [SeqSpan(i, 1, n, t) for i, (n, t) in enumerate(zip(lengths, tables))]
    ref = ref_backend.attend(0, q.float(), AttentionMetadata(spans, torch.zeros(b), b))
    assert_attention_close(out, ref.view_as(out))


@pytest.mark.parametrize("heads", sorted(HEADS))
def test_graph_decoders_replay_like_the_torch_backend(heads):
    """Each batch size's FlashInferGraphDecode captured once (over one page per row) and replayed for steps of other
    lengths, pages and queries: the torch backend's output for each step."""
    num_qo, num_kv, hd = HEADS[heads]
    g = torch.Generator(device="cuda").manual_seed(3)
    pool = torch.randn(1, 2048, 2, num_kv, PAGE_SIZE, hd, device="cuda", generator=g).to(torch.bfloat16)
    fi = FlashInferAttention(pool, hd**-0.5, num_qo)
    ref_backend = TorchAttention(pool.float(), hd**-0.5)
    decoders = fi.graph_decoders(sorted(GRAPH_STEPS), max_num_kv_indices=2048)
    for b, steps in GRAPH_STEPS.items():
        dec = decoders[b]
        assert dec.uses_triton_kernel == (b <= TRITON_DECODE_MAX_ROWS)
        captured = _captured(dec, num_qo, hd)
        for lengths in steps:
            _replay_step(dec, captured, lengths, ref_backend, g)


def test_graph_decoders_sharing_a_plan_slot_replay_in_turn():
    """FlashInfer's graph decoders of every batch size keep their plans in one int workspace (PlanSlot). A decoder
    whose step has the same page counts as its last one skips planning, unless another batch size planned since:
    16 long rows (split KV) and 24 short rows in turn, each step the torch backend's output."""
    num_qo, num_kv, hd = HEADS["16q8kv-hd128"]
    g = torch.Generator(device="cuda").manual_seed(4)
    pool = torch.randn(1, 2048, 2, num_kv, PAGE_SIZE, hd, device="cuda", generator=g).to(torch.bfloat16)
    fi = FlashInferAttention(pool, hd**-0.5, num_qo)
    ref_backend = TorchAttention(pool.float(), hd**-0.5)
    decoders = fi.graph_decoders([16, 24], max_num_kv_indices=2048)
    assert decoders[16]._wrappers[0]._int_workspace_buffer is decoders[24]._wrappers[0]._int_workspace_buffer
    captured = {b: _captured(decoders[b], num_qo, hd) for b in (16, 24)}
    steps = {16: [1000 + 37 * i for i in range(16)], 24: [3 + i for i in range(24)]}
    for b in (16, 24, 16, 24, 24, 16):
        _replay_step(decoders[b], captured[b], steps[b], ref_backend, g)

@pytest.fixture(scope="module", params=sorted(SHAPES))
def engines(request, tmp_path_factory, smollm_tokenizer):
    """bf16 engines with each backend (the FlashInfer one chunks prompts, so prefills over a cached prefix and mixed
    batches occur) on a gentle model (see test_gpu_parity.py), and the transformers fp32/bf16 references."""
    arch = request.param
    path = tmp_path_factory.mktemp(f"fi-{arch}")
    ref32 = gentle_model(arch, path, smollm_tokenizer, seed=11).to("cuda")
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    common = dict(model=str(path), device="cuda", dtype="bfloat16", num_kv_pages=4096, progress=False)
    fi = LLM(attention_backend="flashinfer", max_num_batched_tokens=256, **common)
    tb = LLM(attention_backend="torch", **common)
    assert isinstance(fi.engine.runner.attention, FlashInferAttention)
    assert isinstance(tb.engine.runner.attention, TorchAttention)
    yield fi, tb, ref16, ref32
    fi.close()
    tb.close()


def test_logprobs_within_bf16_tolerance_of_torch_backend(engines):
    """Against the fp32 model, FlashInfer's bf16 error is of the size of the torch backend's and transformers' (and
    at most MAX_BF16_ERROR); on the first generated token (the same context for both backends) their logprobs agree
    within that size."""
    fi, tb, ref16, ref32 = engines
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True)
    for prompt in _prompts()[:5]:
        ours, theirs = fi.generate(prompt, params)[0], tb.generate(prompt, params)[0]
        (fi_err, hf_err), (torch_err, _) = _errors(ours, prompt, ref32, ref16), _errors(theirs, prompt, ref32, ref16)
        print(f"prompt {len(prompt)}: max logprob error vs fp32: flashinfer {fi_err:.3f}, torch {torch_err:.3f}, "
              f"transformers bf16 {hf_err:.3f}")
        assert_error_like_reference(fi_err, max(hf_err, torch_err), MAX_BF16_ERROR)
        tol = min(2 * max(hf_err, torch_err) + 0.1, MAX_BF16_ERROR)
        first_fi, first_tb = dict(ours.logprobs[0].top), dict(theirs.logprobs[0].top)
        diff = max_logprob_gap(first_tb, first_fi)
        assert diff <= tol, f"prompt of {len(prompt)}: backends differ by {diff:.3f}, tolerance {tol:.3f}"


def test_greedy_tokens_agree_like_transformers_bf16(engines):
    """The same demand as tests/gpu/test_gpu_parity.py, for the FlashInfer backend."""
    fi, _, ref16, ref32 = engines
    prompts = _prompts(seed=1, lengths=[5 + 37 * i for i in range(16)])
    ours = [o.token_ids for o in fi.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))]
    exact = [_greedy(ref32, p) for p in prompts]
    hf16 = [_greedy(ref16, p) for p in prompts]
    ours_agree = sum(map(_common_prefix, ours, exact)) / len(prompts)
    hf_agree = sum(map(_common_prefix, hf16, exact)) / len(prompts)
    print(f"mean identical greedy prefix vs fp32: braid flashinfer bf16 {ours_agree:.1f}, "
          f"transformers bf16 {hf_agree:.1f}")
    assert_greedy_agreement(ours, hf16, exact, MIN_FIRST_AGREEMENT)

