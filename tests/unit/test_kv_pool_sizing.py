"""KV pool sizing from a memory snapshot: sized to what the engine can use, cached-but-unused memory counts as free,
a pool that cannot hold one max_model_len request is refused with the numbers that explain why."""
import pytest

from braidinfer.config import EngineConfig
from braidinfer.errors import OutOfPagesError
from braidinfer.memory import DeviceMemory, gpu_pages, pages_needed

GIB = 1 << 30
PAGE = 1 << 20  # bytes per page in these examples


def _pages(memory, util=0.85, max_model_len=4096, max_num_seqs=4, activations=0):
    """Pages for a snapshot; max_model_len=16_384 with max_num_seqs=64 needs 65,536 pages (64 GiB here), more than
    any budget below, so the budget decides."""
    config = EngineConfig(gpu_memory_utilization=util, max_num_seqs=max_num_seqs, page_size=16)
    return gpu_pages(config, memory, PAGE, activations, pages_needed(config, max_model_len), max_model_len)


def test_the_pool_holds_what_the_engine_can_use_not_the_whole_card():
    # 100 GiB free: the budget holds 85 GiB of pages, but 4 requests of 4,096 tokens need 4 * 256 pages.
    memory = DeviceMemory(total=100 * GIB, free=100 * GIB, reserved=0, allocated=0)
    assert _pages(memory) == 4 * 256


def test_the_budget_caps_the_pool():
    # 2 GiB usable at 0.85 of 10 GiB with 6.5 GiB held by another process: 2 GiB / 1 MiB = 2,048 pages < the need.
    memory = DeviceMemory(total=10 * GIB, free=int(3.5 * GIB), reserved=0, allocated=0)
    assert _pages(memory, max_model_len=16_384, max_num_seqs=64) == 2048


def test_memory_cached_by_pytorch_counts_as_free():
    # An engine closed earlier left 6 GiB reserved by the caching allocator, none of it allocated: the same budget
    # as if it had been returned to the driver.
    returned = DeviceMemory(total=10 * GIB, free=9 * GIB, reserved=0, allocated=0)
    cached = DeviceMemory(total=10 * GIB, free=3 * GIB, reserved=6 * GIB, allocated=0)
    assert cached.available == returned.available == 9 * GIB
    big = dict(max_model_len=16_384, max_num_seqs=64)
    assert _pages(cached, **big) == _pages(returned, **big) == int(7.5 * GIB) // PAGE
    # Allocated memory (weights, another live engine) is not free.
    live = DeviceMemory(total=10 * GIB, free=3 * GIB, reserved=6 * GIB, allocated=4 * GIB)
    assert _pages(live, **big) == _pages(returned, **big) - 4 * GIB // PAGE


def test_activations_come_off_the_budget():
    memory = DeviceMemory(total=10 * GIB, free=10 * GIB, reserved=0, allocated=0)
    full = _pages(memory, max_model_len=16_384, max_num_seqs=64)
    assert full == int(8.5 * GIB) // PAGE
    assert _pages(memory, max_model_len=16_384, max_num_seqs=64, activations=GIB) == full - GIB // PAGE


def test_a_pool_without_room_for_one_request_fails_naming_the_memory_and_the_settings():
    memory = DeviceMemory(total=10 * GIB, free=2 * GIB, reserved=5 * GIB, allocated=5 * GIB)
    # 8.5 GiB allowed, 8 GiB in use: 512 pages = 8,192 tokens < one request of 100,000.
    with pytest.raises(OutOfPagesError) as info:
        _pages(memory, max_model_len=100_000)
    message = str(info.value)
    for part in ("fits 8192 tokens", "max_model_len=100000", "gpu_memory_utilization=0.85",
                 "this process (weights, other engines) hold 5.0 GiB", "other processes 3.0 GiB"):
        assert part in message, (part, message)
    assert _pages(memory, max_model_len=8192) == 512  # exactly one request fits: accepted


def test_cpu_pool_is_sized_to_need_within_its_byte_budget(tiny_model_dir):
    from braidinfer import LLM

    with LLM(model=tiny_model_dir("llama"), device="cpu", max_num_seqs=2, max_model_len=64, progress=False) as llm:
        assert llm.engine.pages.num_pages == 2 * 64 // 16


def test_flashinfer_pool_width_pads_to_the_next_supported_head_dim():
    """FlashInfer's kernels cover head_dim 64 / 128 / 256: widths between are padded to the next (Phi-3-mini's 96 to
    128), smaller ones are not (the torch backend serves them), and a CUDA page is budgeted at the padded width."""
    import torch

    from braidinfer.attention.flashinfer_backend import cache_head_dim
    from braidinfer.memory import page_bytes
    from braidinfer.models.config import ModelConfig

    assert [cache_head_dim(d) for d in (32, 64, 80, 96, 128, 160, 256, 512)] == [32, 64, 128, 128, 128, 256, 256, 512]
    cfg = ModelConfig(architecture="Phi3ForCausalLM", vocab_size=32, hidden_size=192, intermediate_size=48,
                      num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, head_dim=96,
                      rms_norm_eps=1e-6, rope_theta=10_000.0, rope_scaling=None, max_position_embeddings=64,
                      tie_word_embeddings=False)
    assert page_bytes(cfg, 16, torch.bfloat16) == 3 * 2 * 2 * 16 * 96 * 2
    assert page_bytes(cfg, 16, torch.bfloat16, cache_head_dim(96)) == 3 * 2 * 2 * 16 * 128 * 2
