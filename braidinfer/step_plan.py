"""How the runner executes one step, decided in one place: `plan_step`, from facts of the scheduled batch, the
engine's configuration and what the runner has captured. Plain Python, no torch.

The paths, tried in this order:

- `decode_graph` / `cascade_graph`: a decode-only step (one new token per sequence) with captured decode graphs
  replays the graph of the smallest bucket that holds it; the cascade one when that bucket has a cascade graph and
  the sequences' shared prefix pages spare at least `cascade_min_saved_tokens` KV reads (braidinfer.attention.
  cascade_plan). A decode-only step that fits no graph (too many sequences, or page tables larger than the graphs'
  buffers) runs eagerly.
- `prefill_graph`: one sequence's step of up to the largest captured token count (a short prefill, a chunk's
  question, a decode step when no decode graphs exist).
- `eager`: everything else, through the attention backend's `plan(meta)`: FlashInfer's paged decode when every
  sequence adds one token, its paged prefill otherwise; or the torch backend.

Which kernel a captured decode bucket attends with (Braid's Triton decode or FlashInfer's) is fixed when the bucket
is built (braidinfer.attention.flashinfer_backend.TRITON_DECODE_MAX_ROWS); the plan names it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from braidinfer.attention.cascade_plan import CascadeStep, plan_cascade
from braidinfer.graph_buckets import bucket_for, num_decode_kv_indices

PathKind = Literal["eager", "decode_graph", "cascade_graph", "prefill_graph"]


@dataclass(frozen=True)
class StepFacts:
    """What the plan needs to know of a scheduled batch, per sequence in batch order."""

    num_new_tokens: Sequence[int]
    """Tokens the step computes for each sequence."""
    kv_lens: Sequence[int]
    """Tokens in each sequence's KV once the step has run (cached ones plus the new ones)."""
    page_tables: Sequence[Sequence[int]]
    """Each sequence's pages in order (possibly with spare pages past those its KV uses)."""


@dataclass(frozen=True)
class PathConfig:
    """The engine's settings that bear on the path, fixed at construction."""

    backend: Literal["torch", "flashinfer"]
    """The eager attention backend."""
    page_size: int
    cascade_min_saved_tokens: int | None = None
    """The least sharing (KV tokens read once instead of repeatedly, per layer and KV head) for which a decode step
    runs cascade decode; None: cascade off."""


@dataclass(frozen=True)
class DecodeGraphSizes:
    """The decode graphs a runner has captured (braidinfer.cuda_graphs.DecodeGraphs)."""

    batch_sizes: tuple[int, ...]
    """Buckets with a plain decode graph, ascending."""
    max_num_kv_indices: int
    """Most page indices a step's page tables may hold to fit the graphs' buffers."""
    scratch_page: int
    """The pool page that padding rows read and write."""
    cascade_batch_sizes: frozenset[int] = frozenset()
    """Buckets that also have a cascade decode graph."""
    triton_batch_sizes: frozenset[int] = frozenset()
    """Buckets whose plain graph attends with kernels.decode_attention (the others: FlashInfer's decode)."""


@dataclass(frozen=True)
class PrefillGraphSizes:
    """The one-sequence prefill graphs a runner has captured (braidinfer.cuda_graphs.PrefillGraphs)."""

    token_counts: tuple[int, ...]
    """Row counts with a captured prefill, ascending."""


@dataclass(frozen=True)
class Capabilities:
    """What the runner can replay at this step (None: no such graphs)."""

    decode_graphs: DecodeGraphSizes | None = None
    prefill_graphs: PrefillGraphSizes | None = None


@dataclass(frozen=True)
class StepPath:
    """The path of one step and why it was chosen."""

    kind: PathKind
    attention: str
    """The attention kernel: "torch", "flashinfer-prefill", "flashinfer-decode", "triton-decode" or
    "flashinfer-cascade"."""
    num_rows: int
    """Rows the forward runs: the graph's bucket (padding included), or the step's tokens when eager."""
    reason: str
    cascade: CascadeStep | None = field(default=None, repr=False)
    """For `cascade_graph`: the step's split into a shared and an own level, padded to num_rows."""

    def __str__(self) -> str:
        return f"{self.kind} ({self.attention}, {self.num_rows} rows): {self.reason}"


def plan_step(facts: StepFacts, config: PathConfig, capabilities: Capabilities) -> StepPath:
    """The path of the step described by `facts` (see the module docstring for the rules)."""
    num_seqs = len(facts.num_new_tokens)
    decode_only = all(n == 1 for n in facts.num_new_tokens)
    if capabilities.decode_graphs is not None and decode_only:
        return _decode_path(facts, config, capabilities.decode_graphs)
    prefill = capabilities.prefill_graphs
    if prefill is not None and num_seqs == 1:
        num_tokens = facts.num_new_tokens[0]
        num_rows = bucket_for(num_tokens, prefill.token_counts)
        if num_rows is not None:
            return StepPath("prefill_graph", "flashinfer-prefill", num_rows,
                            f"one sequence's {num_tokens} new tokens fit the prefill graph of {num_rows} rows")
        return _eager(facts, config, f"one sequence's {num_tokens} new tokens exceed the largest prefill graph "
                                     f"({prefill.token_counts[-1]} rows)")
    if capabilities.decode_graphs is None and capabilities.prefill_graphs is None:
        return _eager(facts, config, "no CUDA graphs captured")
    kind = "a decode step" if decode_only else "a step with prefill tokens"
    return _eager(facts, config, f"{kind} of {num_seqs} sequences: no captured graph runs it")


def _decode_path(facts: StepFacts, config: PathConfig, graphs: DecodeGraphSizes) -> StepPath:
    num_seqs, page_size = len(facts.num_new_tokens), config.page_size
    bucket = bucket_for(num_seqs, graphs.batch_sizes)
    if bucket is None:
        return _eager(facts, config, f"a decode step of {num_seqs} sequences exceeds the largest decode graph "
                                     f"({graphs.batch_sizes[-1]} rows)")
    if bucket in graphs.cascade_batch_sizes:
        step = plan_cascade(facts.page_tables, facts.kv_lens, page_size, bucket, graphs.scratch_page,
                            config.cascade_min_saved_tokens)
        num_indices = None if step is None else max(len(step.shared_kv_indices), len(step.own_kv_indices))
        if num_indices is not None and num_indices <= graphs.max_num_kv_indices:
            return StepPath("cascade_graph", "flashinfer-cascade", bucket,
                            f"a decode step of {num_seqs} sequences whose {step.num_groups} group(s) sharing prefix "
                            f"pages spare {step.num_saved_tokens} KV token reads "
                            f"(>= {config.cascade_min_saved_tokens})", cascade=step)
    num_indices = num_decode_kv_indices(facts.kv_lens, page_size, bucket)
    if num_indices > graphs.max_num_kv_indices:
        return _eager(facts, config, f"a decode step of {num_seqs} sequences whose KV and padding span {num_indices} "
                                     f"pages, more than the decode graphs' {graphs.max_num_kv_indices}")
    attention = "triton-decode" if bucket in graphs.triton_batch_sizes else "flashinfer-decode"
    return StepPath("decode_graph", attention, bucket, f"a decode step of {num_seqs} sequences fits the graph of "
                                                       f"{bucket} rows")


def _eager(facts: StepFacts, config: PathConfig, reason: str) -> StepPath:
    decode_only = all(n == 1 for n in facts.num_new_tokens)
    attention = ("torch" if config.backend == "torch" else
                 "flashinfer-decode" if decode_only else "flashinfer-prefill")
    return StepPath("eager", attention, sum(facts.num_new_tokens), reason)
