"""Engine configuration: validated once at construction, then passed down (never patched at run time)."""
from __future__ import annotations

import os
import re
from typing import ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from braidinfer.attention.cascade_plan import DEFAULT_MIN_SAVED_TOKENS
from braidinfer.validation import ValidatedModel

_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


class EngineConfig(ValidatedModel):
    """How to load the model and size the engine. Values discovered at run time (page count, eos ids) live elsewhere."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)  # no True, "16", 16.0
    error_prefix: ClassVar[str] = "invalid engine configuration"

    model: str | None = None
    """A local model directory, a `.gguf` file (a `str` or an `os.PathLike` such as a `pathlib.Path`), a hub id
    (downloaded into the Hugging Face cache on first use; HF_HUB_OFFLINE=1 keeps to the cache), or None for the
    embedded model."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and activations dtype; auto = bfloat16 on CUDA, float32 on CPU."""
    kv_cache_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The KV page pool's dtype. auto: `dtype`, except bfloat16 for a float32 model on the CPU with projections in the
    int4 form (`cpu_int4`, which rounds their inputs to bfloat16 already): half the KV bytes, so twice the tokens in
    `cpu_kv_cache_bytes` and ~30% faster decode of the embedded model at 1.5k tokens of context, where attention reads
    the pool. One other than `dtype` needs the CPU (the torch attention backend casts q to it and its output back)."""
    weight_format: Literal["auto", "dequantize"] = "auto"
    """How a GGUF checkpoint's quantised weights are held. "auto": Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K
    tensors stay quantised in memory and the engine computes from the blocks (GPU kernels; on the CPU, see `cpu_int4`);
    tensors of other types are dequantised and the load summary (the log, `LLM.load_summary`) names them.
    "dequantize": every tensor is dequantised to `dtype` at load. Safetensors checkpoints are loaded as they are
    either way."""
    cpu_int4: bool | None = None
    """On the CPU with weight_format "auto": hold the projections of every kept type but Q6_K in torch's int4
    weight-only matmul form (4-bit terms of the GGUF values, activations rounded to bfloat16 for the product) instead of
    decoding them to float at load. None: Braid's own kernels where they run (`cpu_native_kernels`), else torch's int4
    form where this CPU's int4 kernels are fast (AVX-512; braidinfer/layers/cpu_int4.py); False: decoded to float (no
    quantised form at all). Ignored on CUDA."""
    cpu_native_kernels: bool | None = None
    """On the CPU with weight_format "auto" and `cpu_int4` not False, for a float32 model: compute the projections of
    every kept type with Braid's own integer-dot kernels (braid_kernels/cpu_quant.c: AVX-512 VNNI, codes packed once
    from the GGUF blocks at about their size, each row of x rounded per 32 values to two int8 terms, ~16 bits, where
    llama.cpp rounds to one) instead of torch's int4 op, and RMSNorm, SiLU-and-mul and decoding rows' attention with its
    C kernels (see `fused_kernels`): ~1.5x faster decode of the embedded model. The library is built with the system's C
    compiler on first use (a few seconds, once per machine, in Braid's cache). None: where it builds and the CPU has
    AVX-512 VNNI, unless `cpu_int4` is True (torch's int4 op asked for); True: required (an error where it cannot run);
    False: never. Ignored on CUDA."""
    cpu_decoded_prefill: bool = False
    """On the CPU, for projections in the int4 form (`cpu_int4`): steps of 128 rows and more (prefills) decode each
    matrix to bfloat16 (float32 without AMX) and use torch's matmul instead of the int4 op, whose time grows with
    every row: a 1.5k-token prompt prefills ~2.5x faster on the embedded model. Off by default because the two paths
    round differently (~0.3% of an output), so a request's greedy answer can then differ between running alone and
    in a batch."""
    cpu_decode_threads: int | None = Field(None, ge=1)
    """On the CPU: torch's intra-op threads for decode steps (every row one new token); prefill steps keep the engine
    thread's count (torch.get_num_threads()), and so do a decode step's logits (one large product) where that count
    is the larger. None: measured while decoding (1, 2, 4, ... up to that count; the fastest is kept and measured
    again after 512 to 4,096 steps), because two threads decode the embedded model ~20% faster than one on a 2-core
    machine but ~40% slower while another thread of the process splits torch ops over threads (e.g. an embedding
    model run on the CPU; braidinfer/step_threads.py). Ignored on CUDA."""
    device: str | None = None
    """"cpu", "cuda" or "cuda:N"; None picks CUDA when available."""
    page_size: int = Field(16, ge=1, le=1024)
    """Tokens per KV page."""
    max_num_seqs: int = Field(64, ge=1)
    """Most sequences decoded together in one step."""
    max_num_batched_tokens: int = Field(2048, ge=16)
    """Most tokens (prefill chunks plus decodes) in one forward pass; long prompts are prefilled in chunks of this size."""
    max_model_len: int | None = Field(None, ge=2)
    """Longest prompt plus output; defaults to the model's max_position_embeddings."""
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    """Most of the GPU's memory that may be in use once the engine is built (everything on the card counts: other
    processes, other engines, this one's weights, activations and KV pages). The KV pool takes what `max_num_seqs`
    requests of `max_model_len` tokens can use, within this; construction fails if not even one such request fits."""
    cpu_kv_cache_bytes: int = Field(1 << 30, ge=1 << 16)
    """Most bytes of the KV page pool on the CPU (it holds at most `max_num_seqs` requests of `max_model_len`). The
    pool is reserved, not resident: RAM is taken as its pages are first written."""
    num_kv_pages: int | None = Field(None, ge=1)
    """Exact number of KV pages, overriding the memory-based sizing (useful in tests)."""
    enable_prefix_caching: bool = True
    """Reuse the KV of any identical, already computed page-aligned prompt prefix."""
    max_pinned_fraction: float = Field(0.75, ge=0.0, le=1.0)
    """Most of the KV page pool that pinned chunks may hold; the rest stays for requests."""
    attention_backend: Literal["auto", "torch", "flashinfer"] = "auto"
    """Paged attention kernels: "flashinfer" (CUDA, float16/bfloat16), "torch" (anywhere; the reference), or "auto"
    = flashinfer where it can run, else torch."""
    enforce_eager: bool = False
    """Run every step eagerly. When False (the default), decode-only steps are captured in CUDA graphs, one per
    batch-size bucket up to max_num_seqs (at most 512), when the attention backend is FlashInfer; on the CPU with
    Braid's C kernels (cpu_native_kernels), decode steps of up to 8 sequences replay each decoder layer's recorded
    kernel calls without its Python (braidinfer.cpu_graphs); elsewhere (the torch backend on CUDA, the CPU without
    the C kernels) steps run eagerly anyway."""
    cascade_decode: bool = True
    """With CUDA graphs: a decode step whose sequences share prefix pages (the same pinned system prompt or document,
    any common prefix served from the cache) reads the shared KV once per group of sequences rather than once per
    sequence (cascade attention), when that spares at least `cascade_min_saved_tokens` KV reads per layer and KV
    head; other steps run plain paged decode. Off: every step runs plain paged decode."""
    cascade_min_saved_tokens: int = Field(DEFAULT_MIN_SAVED_TOKENS, ge=0)
    """The least sharing, in KV tokens read once instead of repeatedly, for which a step runs cascade decode."""
    async_scheduling: bool | None = None
    """Queue each step on the device before appending the previous step's tokens on the host, so that the host's
    work (scheduling, detokenizing, streaming) overlaps the GPU's; requests with penalties, grammars or logprobs
    still take their steps one at a time. A request that stops on a token has one more token computed, dropped.
    None (the default): on with CUDA, off on the CPU (where nothing overlaps)."""
    fused_kernels: bool = True
    """Use the Triton kernels of `braid_kernels/` on CUDA: RMSNorm (with the residual add), SiLU-and-mul, QK-norm +
    RoPE + KV write, and for one-token steps GEMVs with the norm or SiLU-and-mul in their prologue (see gemv_decode);
    on the CPU, with projections in Braid's integer-dot form (`cpu_native_kernels`), its C kernels for RMSNorm,
    SiLU-and-mul and the attention of decoding rows (elsewhere the CPU runs the PyTorch path). They keep the PyTorch path's rounding points; only summation orders differ.
    `LLMEngine.kernel_paths` lists the path each layer runs."""
    gemv_decode: bool = True
    """With fused_kernels on CUDA: steps of one row (batch-1 decode) run each projection as a GEMV kernel with the norm
    or SiLU-and-mul before it in its prologue (braid_kernels/gemv.py), which beats cuBLAS at one row. Off: those steps run
    cuBLAS and the elementwise kernels like every other step (for comparisons)."""
    freeze_gc: bool = False
    """Once loaded, collect garbage and freeze every object alive (`gc.freeze`) until the engine closes, so that
    Python's full collections, which otherwise scan the whole loaded heap (260-320 ms measured on an H200 host with
    torch, transformers and FlashInfer loaded, every thread stopped), scan only what serving allocates
    (braidinfer.heap). Loading then costs one full collection more."""
    seed: int = 0
    """Seed of the engine's generator for requests that give none."""
    progress: bool = True
    """Show progress bars while loading."""

    @field_validator("model", mode="before")
    @classmethod
    def _path_as_text(cls, value: object) -> object:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @model_validator(mode="after")
    def _check_device(self):
        if self.device is not None and not _DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if (self.device is not None and self.device.startswith("cuda") and self.dtype != "auto"
                and self.kv_cache_dtype not in ("auto", self.dtype)):
            raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype!r} differs from dtype {self.dtype!r}, which needs "
                             "device 'cpu'")
        if self.attention_backend == "flashinfer" and (self.device == "cpu" or self.dtype == "float32"):
            raise ValueError("attention_backend 'flashinfer' needs a CUDA device and dtype float16 or bfloat16, "
                             f"got device={self.device!r}, dtype={self.dtype!r}")
        return self

