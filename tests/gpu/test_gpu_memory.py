"""GPU memory as a good citizen: the default KV pool is sized to what the engine can use, memory PyTorch caches
from an engine closed earlier counts as free, closing an engine returns its memory, two engines share one process,
and a budget without room for one request fails at construction with a message that explains it."""
from __future__ import annotations

import gc
import multiprocessing

import pytest
import torch

from braidinfer import LLM, SamplingParams
from braidinfer.attention.flashinfer_backend import cache_head_dim
from braidinfer.errors import OutOfPagesError
from braidinfer.memory import activation_bytes, page_bytes, pages_needed, runtime_bytes

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
BASE = {"device": "cuda", "dtype": "bfloat16", "progress": False}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    """A tiny Llama (4 KiB per KV page) with a context long enough for requests that need more than a budget."""
    return tiny_model_dir("llama", seed=5, max_position_embeddings=1 << 20)


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 49152, (20 + i,), generator=g).tolist() for i in range(3)]


def _budget_utilization(llm_config_kwargs: dict, model_dir: str, headroom: int) -> float:
    """The gpu_memory_utilization that leaves `headroom` bytes of KV budget beyond what is in use now and what the
    tiny model's weights and activations take (so that the budget, not the need, sizes the pool)."""
    from braidinfer.config import EngineConfig
    from braidinfer.loader import resolve_model
    from braidinfer.models import ModelConfig

    free, total = torch.cuda.mem_get_info()
    in_use = total - (free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated())
    cfg = ModelConfig.from_hf_config(resolve_model(model_dir).hf_config)
    config = EngineConfig(model=model_dir, **llm_config_kwargs)
    weights = 64 << 20  # the tiny model's weights are far below this
    max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    per_page = page_bytes(cfg, config.page_size, torch.bfloat16, cache_head_dim(cfg.head_dim))
    overhead = activation_bytes(config, cfg, torch.bfloat16) + runtime_bytes(config, cfg, torch.bfloat16, per_page,
                                                                             max_model_len)
    return (in_use + weights + overhead + headroom) / total


def test_the_default_pool_holds_what_the_engine_can_use(model_dir):
    with LLM(model_dir, max_num_seqs=4, max_model_len=256, **BASE) as llm:
        assert llm.engine.pages.num_pages == 4 * 256 // 16
        assert len(llm.generate(_prompts(), GREEDY)) == 3


def test_closing_returns_the_memory(model_dir):
    gc.collect()
    before = torch.cuda.memory_allocated()
    llm = LLM(model_dir, max_num_seqs=8, max_model_len=512, **BASE)
    expected = [o.token_ids for o in llm.generate(_prompts(), GREEDY)]
    assert torch.cuda.memory_allocated() > before
    llm.close()
    assert torch.cuda.memory_allocated() - before < (1 << 20), "tensors of a closed engine are still alive"
    with LLM(model_dir, max_num_seqs=8, max_model_len=512, **BASE) as again:
        assert [o.token_ids for o in again.generate(_prompts(), GREEDY)] == expected


def test_memory_cached_by_pytorch_counts_as_free(model_dir):
    """The pool of an engine built while 8 GiB sit in PyTorch's cache (freed, not returned) equals the pool built
    after the cache was emptied: before, the cached memory counted as used and the second engine got a tiny pool."""
    kwargs = {**BASE, "max_num_seqs": 512, "max_model_len": 4096}  # a need of 512 MiB: the budget binds
    torch.cuda.empty_cache()
    util = _budget_utilization(kwargs, model_dir, headroom=256 << 20)
    with LLM(model_dir, gpu_memory_utilization=util, **kwargs) as llm:
        returned = llm.engine.pages.num_pages
    block = torch.empty(8 << 30, dtype=torch.uint8, device="cuda")
    del block  # stays reserved by the caching allocator
    assert torch.cuda.memory_reserved() >= 8 << 30
    with LLM(model_dir, gpu_memory_utilization=util, **kwargs) as llm:
        cached = llm.engine.pages.num_pages
        assert len(llm.generate(_prompts(), GREEDY)) == 3
        per_page = page_bytes(llm.engine.model_config, 16, torch.bfloat16, llm.engine.runner.kv_cache.shape[-1])
    assert returned >= (128 << 20) // per_page  # the budget, not a leftover sliver
    assert abs(cached - returned) <= max(4, returned // 100)


def test_two_engines_in_one_process_both_serve(model_dir):
    with LLM(model_dir, max_num_seqs=4, max_model_len=512, **BASE) as one:
        expected = [o.token_ids for o in one.generate(_prompts(), GREEDY)]
        with LLM(model_dir, max_num_seqs=4, max_model_len=512, **BASE) as two:
            assert [o.token_ids for o in two.generate(_prompts(), GREEDY)] == expected
            assert [o.token_ids for o in one.generate(_prompts(), GREEDY)] == expected


def test_a_budget_without_room_for_one_request_fails_at_construction(model_dir):
    kwargs = {**BASE, "max_num_seqs": 1, "max_model_len": 1 << 20}  # one request: 256 MiB of KV
    util = _budget_utilization(kwargs, model_dir, headroom=0)  # < 64 MiB left for KV
    with pytest.raises(OutOfPagesError, match=r"max_model_len=1048576.*gpu_memory_utilization"):
        LLM(model_dir, gpu_memory_utilization=util, **kwargs)


def test_closing_an_engine_with_cuda_graphs_returns_the_memory(tiny_model_dir):
    """The same for an engine on FlashInfer with CUDA graphs (head_dim 64): after one engine has run in the process
    (what it leaves is per process: FlashInfer's modules, the capture stream's cuBLAS workspaces), building, using and
    closing another leaves nothing allocated."""
    model_dir = tiny_model_dir("llama", seed=6, hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    with LLM(model_dir, max_num_seqs=8, max_model_len=512, **BASE) as first:
        assert first.engine.runner.graphs is not None
        first.generate(_prompts(), GREEDY)
    gc.collect()
    before = torch.cuda.memory_allocated()
    llm = LLM(model_dir, max_num_seqs=8, max_model_len=512, **BASE)
    llm.generate(_prompts(), GREEDY)
    assert llm.engine.runner.graphs.num_replays > 0
    llm.close()
    gc.collect()
    assert torch.cuda.memory_allocated() - before < (1 << 20), "tensors of a closed engine are still alive"


def _serve_on_a_binding_budget(model_dir: str, kwargs: dict) -> tuple[int, float, str]:
    """In a process of its own (spawned: nothing loaded yet, as for a user's first engine), an engine built with the
    budget binding serves 192 requests; returns (the card's memory in use, the budget, what the process holds)."""
    torch.ones(1, device="cuda")  # the CUDA context exists before the budget is measured, as in the engine
    util = _budget_utilization(kwargs, model_dir, headroom=256 << 20)
    with LLM(model_dir, gpu_memory_utilization=util, **kwargs) as llm:
        assert llm.engine.runner.graphs is not None
        assert llm.engine.pages.num_pages < pages_needed(llm.engine.config, 4096)  # the budget binds
        g = torch.Generator().manual_seed(8)
        prompts = [torch.randint(3, 49152, (20 + i % 7,), generator=g).tolist() for i in range(192)]
        assert len(llm.generate(prompts, GREEDY)) == 192
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        mib = 1 << 20
        state = (f"PyTorch reserves {torch.cuda.memory_reserved() / mib:.0f} MiB "
                 f"({torch.cuda.memory_allocated() / mib:.0f} allocated, KV pool "
                 f"{llm.engine.runner.kv_cache.nbytes / mib:.0f})")
    return total - free, util * total, state


def test_a_budget_bound_engine_stays_within_gpu_memory_utilization(tiny_model_dir):
    """Everything on the card counts, what the engine allocates after sizing its pool too (FlashInfer's workspace and
    plans, the CUDA graphs, the kernels loaded): the first engine of a process, built and serving a batch with the
    budget binding, keeps the card's memory in use within gpu_memory_utilization (before, the workspace, 50 plans of
    8 MiB and the graphs came on top: 258 MiB over on an H100 with the plans shared, some 600 without)."""
    model_dir = tiny_model_dir("llama", seed=7, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                               max_position_embeddings=4096)
    kwargs = {**BASE, "max_num_seqs": 256, "max_model_len": 4096}
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        in_use, budget, state = pool.apply(_serve_on_a_binding_budget, (model_dir, kwargs))
    mib = 1 << 20
    assert in_use <= budget, f"in use {in_use / mib:.0f} MiB, budget {budget / mib:.0f} MiB; {state}"
