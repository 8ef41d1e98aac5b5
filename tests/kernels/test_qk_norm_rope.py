"""qk_norm_rope_write_kv against its reference (whose match with the model's attention and the torch backend's KV
write is checked in test_references_match_model.py)."""
from __future__ import annotations

import pytest
import torch

from braid_kernels import qk_norm_rope_write_kv, qk_norm_rope_write_kv_ref
from tests.kernels.common import assert_rounding_matches, assert_same_bits, exact_sum_values, norm_weight, rope_tables

CONFIGS = {  # head layouts scaled down for the interpreter; real ones in test_real_shapes_on_gpu
    "qwen3": dict(num_qo_heads=4, num_kv_heads=2, head_dim=128, theta=1_000_000.0, qk_norm=True),
    "qwen3-hd64": dict(num_qo_heads=2, num_kv_heads=1, head_dim=64, theta=1_000_000.0, qk_norm=True),
    "llama": dict(num_qo_heads=3, num_kv_heads=1, head_dim=64, theta=10_000.0, qk_norm=False),
}
PAGE_SIZE, NUM_PAGES, MAX_POSITIONS = 4, 8, 600


def _inputs(config, num_tokens, dtype, device, exact, seed=0, pad_last=True, page_size=PAGE_SIZE,
            num_pages=NUM_PAGES, max_positions=MAX_POSITIONS):
    """Keyword arguments for both functions; with pad_last the last token is padding (slot -1). The pool starts
    random, so that slots nobody writes are checked to stay as they were."""
    g = torch.Generator().manual_seed(seed)
    hq, hkv, hd = config["num_qo_heads"], config["num_kv_heads"], config["head_dim"]
    shape = (num_tokens, (hq + 2 * hkv) * hd)
    qkv = (exact_sum_values(shape, dtype, device, g) if exact
           else (3 * torch.randn(shape, generator=g)).to(dtype).to(device))
    slots = torch.randperm(num_pages * page_size, generator=g)[:num_tokens]
    if pad_last:
        slots[-1] = -1
    cos, sin = rope_tables(hd, config["theta"], max_positions, device)
    args = dict(
        qkv=qkv,
        positions=torch.randint(0, max_positions, (num_tokens,), generator=g).to(device),
        cos=cos, sin=sin,
        kv_cache=torch.randn(num_pages, 2, hkv, page_size, hd, generator=g).to(dtype).to(device),
        slot_mapping=slots.to(device),
    )
    if config["qk_norm"]:
        args["q_norm_weight"] = norm_weight(hd, dtype, device, high=4.0, generator=g)
        args["k_norm_weight"] = norm_weight(hd, dtype, device, high=96.0, generator=g)  # Qwen3's k_norm reaches ~96
    return args


def _run_both(args, ready=(False, False)):
    """(q, pool) from the kernel and from the reference, each on its own copy of the pool; ready: the kernel's
    (static_weights, positions_ready)."""
    ours, ref = dict(args, kv_cache=args["kv_cache"].clone()), dict(args, kv_cache=args["kv_cache"].clone())
    flags = dict(static_weights=ready[0], positions_ready=ready[1])
    return (qk_norm_rope_write_kv(**ours, **flags), ours["kv_cache"]), (qk_norm_rope_write_kv_ref(**ref),
                                                                         ref["kv_cache"])


READY = [(False, False), (True, False), (True, True)]  # what the kernel loads before its PDL wait: nothing, the
# norm weights, and the positions, slots and rotary rows too


@pytest.mark.parametrize("ready", READY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_bits_when_sums_are_exact(device, name, dtype, ready):
    (q, pool), (q_ref, pool_ref) = _run_both(_inputs(CONFIGS[name], 4, dtype, device, exact=True), ready)
    assert_same_bits(q, q_ref)
    assert_same_bits(pool, pool_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_reference_on_random_inputs(device, name, dtype):
    """Without QK-norm nothing is summed, so RoPE alone gives the same bits on any input."""
    (q, pool), (q_ref, pool_ref) = _run_both(_inputs(CONFIGS[name], 3, dtype, device, exact=False, seed=1))
    compare = assert_rounding_matches if CONFIGS[name]["qk_norm"] else assert_same_bits
    compare(q, q_ref)
    compare(pool, pool_ref)


def test_padding_tokens_write_nothing(device):
    args = _inputs(CONFIGS["qwen3-hd64"], 2, torch.bfloat16, device, exact=True)
    args["slot_mapping"] = torch.full((2,), -1, device=device)
    pool = args["kv_cache"].clone()
    q = qk_norm_rope_write_kv(**args)
    assert_same_bits(args["kv_cache"], pool)
    assert_same_bits(q, qk_norm_rope_write_kv_ref(**dict(args, kv_cache=pool.clone())))


def test_strided_qkv_int32_indices_and_tables_in_model_dtype(device):
    args = _inputs(CONFIGS["llama"], 3, torch.bfloat16, device, exact=False, seed=2)
    width = args["qkv"].shape[1]
    wide = torch.zeros(3, width + 64, dtype=torch.bfloat16, device=device)
    wide[:, :width] = args["qkv"]
    args.update(qkv=wide[:, :width], positions=args["positions"].int(), slot_mapping=args["slot_mapping"].int(),
                cos=args["cos"].to(torch.bfloat16), sin=args["sin"].to(torch.bfloat16))
    (q, pool), (q_ref, pool_ref) = _run_both(args)
    assert_same_bits(q, q_ref)
    assert_same_bits(pool, pool_ref)


def test_no_tokens(device):
    args = _inputs(CONFIGS["llama"], 1, torch.bfloat16, device, exact=True)
    args.update(qkv=args["qkv"][:0], positions=args["positions"][:0], slot_mapping=args["slot_mapping"][:0])
    assert qk_norm_rope_write_kv(**args).shape == (0, 3, 64)


_BAD = {
    "one norm weight only": (lambda a: a.pop("k_norm_weight"), "both q_norm_weight and k_norm_weight"),
    "qkv width": (lambda a: a.update(qkv=a["qkv"][:, :-32]), "qkv's width"),
    "no q heads": (lambda a: a.update(qkv=a["qkv"][:, : 2 * 64]), "qkv's width"),
    "pool dtype": (lambda a: a.update(kv_cache=a["kv_cache"].float()), "dtypes must match"),
    "pool layout": (lambda a: a.update(kv_cache=a["kv_cache"][:, :1]), r"\[num_pages, 2, num_kv_heads"),
    "positions length": (lambda a: a.update(positions=a["positions"][:1]), "positions must have shape"),
    "strided positions": (lambda a: a.update(positions=a["positions"].repeat_interleave(2)[::2]),
                          "positions must be contiguous"),
    "float positions": (lambda a: a.update(positions=a["positions"].float()), "positions must have dtype"),
    "slot_mapping 2-d": (lambda a: a.update(slot_mapping=a["slot_mapping"][None]), "slot_mapping must be 1-dim"),
    "cos width": (lambda a: a.update(cos=a["cos"][:, :32]), "cos must be"),
    "sin shape": (lambda a: a.update(sin=a["sin"][:10]), "sin must have shape"),
    "norm weight size": (lambda a: a.update(q_norm_weight=a["q_norm_weight"][:32]), "q_norm_weight must have shape"),
    "integer qkv": (lambda a: a.update(qkv=a["qkv"].int()), "qkv must have dtype"),
    "eps": (lambda a: a.update(eps=-1.0), "eps must be"),
}


@pytest.mark.parametrize("case", sorted(_BAD))
def test_bad_arguments_are_value_errors(device, case):
    change, message = _BAD[case]
    args = _inputs(CONFIGS["qwen3-hd64"], 2, torch.bfloat16, device, exact=True)
    change(args)
    with pytest.raises(ValueError, match=message):
        qk_norm_rope_write_kv(**args)


REAL = {  # Qwen3-0.6B and SmolLM2-135M
    "qwen3-0.6b": dict(num_qo_heads=16, num_kv_heads=8, head_dim=128, theta=1_000_000.0, qk_norm=True),
    "smollm2-135m": dict(num_qo_heads=9, num_kv_heads=3, head_dim=64, theta=100_000.0, qk_norm=False),
}


@pytest.mark.gpu
@pytest.mark.parametrize("ready", READY)
@pytest.mark.parametrize("num_tokens", [1, 7, 1024])
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_shapes_on_gpu(name, num_tokens, ready):
    config = REAL[name]
    args = _inputs(config, num_tokens, torch.bfloat16, "cuda", exact=False, seed=num_tokens,
                   pad_last=num_tokens > 1, page_size=16, num_pages=256, max_positions=4096)
    (q, pool), (q_ref, pool_ref) = _run_both(args, ready)
    compare = assert_rounding_matches if config["qk_norm"] else assert_same_bits
    compare(q, q_ref)
    compare(pool, pool_ref)
    (q, pool), (q_ref, pool_ref) = _run_both(dict(args, qkv=exact_sum_values(args["qkv"].shape, torch.bfloat16,
                                                                              "cuda")), ready)
    assert_same_bits(q, q_ref)
    assert_same_bits(pool, pool_ref)
