"""Per-layer attention specs (sliding window, logit soft-cap, scale) on FlashInfer against the torch backend: the
eager prefill / mixed / decode kernels and the CUDA-graph decode, on a two-layer pool whose layers differ, as Gemma's
local and global layers do."""
from __future__ import annotations

import pytest
import torch

from braidinfer.attention import AttentionMetadata, SeqSpan, TorchAttention
from braidinfer.attention.flashinfer_backend import FlashInferAttention
from braidinfer.attention.spec import AttentionSpec
from tests.gpu.test_flashinfer_backend import BATCHES, PAGE_SIZE, _random_batch
from tests.gpu.test_gpu_parity import NEEDS_FLASHINFER
from tests.support.numerics import assert_attention_close

pytestmark = [pytest.mark.gpu, NEEDS_FLASHINFER]

NUM_QO, NUM_KV, HD = 8, 4, 128
LAYER_SPECS = {
    "window+plain": [AttentionSpec(HD**-0.5, sliding_window=37), AttentionSpec(HD**-0.5)],
    "softcap+window": [AttentionSpec(0.1, logits_soft_cap=5.0), AttentionSpec(0.1, sliding_window=64,
                                                                              logits_soft_cap=5.0)],
}


def _two_layer_pool(meta_pool):
    return torch.cat([meta_pool, meta_pool.roll(1, dims=1)])  # two layers, different contents


@pytest.mark.parametrize("specs", sorted(LAYER_SPECS))
@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_eager_kernels_follow_each_layers_spec(specs, batch):
    layer_specs = LAYER_SPECS[specs]
    pool1, meta = _random_batch(BATCHES[batch], NUM_KV, HD, seed=5)
    pool16 = _two_layer_pool(pool1).to(torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(2)
    ref_pool = pool16.float()
    ref_backend = TorchAttention(ref_pool, layer_specs)
    fi = FlashInferAttention(pool16, layer_specs, NUM_QO)
    fi.plan(meta)
    assert fi.plain_reason is not None
    for layer in range(2):
        q, k, v = (torch.randn(meta.num_tokens, h, HD, device="cuda", generator=g).to(torch.bfloat16) * 4
                   for h in (NUM_QO, NUM_KV, NUM_KV))  # large scores: the cap bites
        ref = ref_backend(layer, q.float(), k.float(), v.float(), meta)
        out = fi(layer, q, k, v, meta)
        assert_attention_close(out, ref)
        if not layer_specs[layer].is_plain:  # the spec changes this batch's attention
            plain = TorchAttention(ref_pool.clone(), layer_specs[layer].scale)
            assert (plain(layer, q.float(), k.float(), v.float(), meta) - ref).abs().max() > 0.05


@pytest.mark.parametrize("specs", sorted(LAYER_SPECS))
def test_graph_decode_follows_each_layers_spec(specs):
    """A FlashInfer graph decode (no Triton kernel: the specs are not plain) captured once and replayed for steps
    of other lengths, per layer against the torch backend."""
    layer_specs = LAYER_SPECS[specs]
    g = torch.Generator(device="cuda").manual_seed(7)
    pool = torch.randn(2, 512, 2, NUM_KV, PAGE_SIZE, HD, device="cuda", generator=g).to(torch.bfloat16)
    fi = FlashInferAttention(pool, layer_specs, NUM_QO)
    ref_backend = TorchAttention(pool.float(), layer_specs)
    b = 4
    dec = fi.graph_decoders([b], max_num_kv_indices=512)[b]
    assert not dec.uses_triton_kernel
    q = torch.zeros(2, b, NUM_QO, HD, dtype=torch.bfloat16, device="cuda")
    dec.plan(list(range(b + 1)), list(range(b)), [1] * b, positions=torch.zeros(b, device="cuda"))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for layer in range(2):
            dec.attend(layer, q[layer], None)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            outs = [dec.attend(layer, q[layer], None) for layer in range(2)]
    torch.cuda.current_stream().wait_stream(stream)
    for lengths in ([1, 16, 17, 300], [1000, 2, 48, 33], [65, 64, 63, 129]):
        need = [-(-n // PAGE_SIZE) for n in lengths]
        pages = torch.randperm(512, device="cuda", generator=g)[: sum(need)]
        tables = pages.split(need)
        indptr = torch.tensor([0, *need]).cumsum(0).tolist()
        last = [n - (p - 1) * PAGE_SIZE for n, p in zip(lengths, need)]
        dec.plan(indptr, pages.tolist(), last, positions=torch.tensor(lengths, device="cuda") - 1)
        q.copy_(torch.randn(2, b, NUM_QO, HD, device="cuda", generator=g) * 4)
        graph.replay()
        spans = [SeqSpan(i, 1, n, t) for i, (n, t) in enumerate(zip(lengths, tables))]
        meta = AttentionMetadata(spans, torch.zeros(b), b)
        for layer in range(2):
            ref = ref_backend.attend(layer, q[layer].float(), meta)
            assert_attention_close(outs[layer], ref.view_as(outs[layer]))


def test_graph_prefill_follows_each_layers_spec():
    layer_specs = LAYER_SPECS["softcap+window"]
    g = torch.Generator(device="cuda").manual_seed(9)
    pool = torch.randn(2, 64, 2, NUM_KV, PAGE_SIZE, HD, device="cuda", generator=g).to(torch.bfloat16)
    fi = FlashInferAttention(pool, layer_specs, NUM_QO)
    ref_backend = TorchAttention(pool.float(), layer_specs)
    rows = 32
    pre = fi.graph_prefills([rows], max_num_pages=16)[rows]
    kv_len, new = 150, 20
    pages = torch.randperm(63, device="cuda", generator=g)[: -(-kv_len // PAGE_SIZE)]
    pre.plan(new, pages.tolist(), kv_len, scratch_page=63)
    q = torch.randn(rows, NUM_QO, HD, device="cuda", generator=g).to(torch.bfloat16) * 4
    meta = AttentionMetadata([SeqSpan(0, new, kv_len, pages)], torch.zeros(new), new)
    for layer in range(2):
        out = pre.attend(layer, q, None)[:new]
        ref = ref_backend.attend(layer, q[:new].float(), meta)
        assert_attention_close(out, ref)
