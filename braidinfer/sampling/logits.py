"""The logits of one step -> the sampled tokens of its rows: penalties, grammar masks, then the sampler, with a
row-by-row fallback so that one request whose sampling breaks does not take the batch down with it."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from braidinfer.sampling.guided import apply_token_masks
from braidinfer.sampling.penalties import apply_penalties
from braidinfer.sampling.sampler import Sampler, SamplerOutput
from braidinfer.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass
class SampledBatch:
    """The rows that sampled (in row order), their token ids [n] on the logits' device, their logprobs (None where not
    asked for), and the sequences whose own sampling failed, with the error (the caller fails them)."""

    seqs: list[Sequence]
    token_ids: torch.Tensor
    logprobs: list
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)


def sample_batch(sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence]) -> SampledBatch:
    """Samples one token for each row. logits: [len(seqs), vocab] in the model's dtype.

    When the batch fails, each row is sampled again alone, so only the requests whose own sampling breaks
    (penalties, grammar, sampler) end up in `failed`."""
    if not seqs:
        return SampledBatch([], logits.new_empty(0, dtype=torch.int64), [])
    raw = logits
    if any(s.params.penalized or s.matcher is not None for s in seqs):
        # Penalties and grammar masks write into the logits, and in float32 (bf16 would round a penalised logit):
        # they get a float32 copy, raw keeps the model's for a retry.
        raw = logits.float()
        logits = raw.clone()
    try:
        out = _sample_rows(sampler, logits, seqs, raw)
        return SampledBatch(seqs, out.token_ids, out.logprobs)
    except Exception:
        log.exception("sampling a batch of %d failed; sampling its rows one at a time", len(seqs))
    result = SampledBatch([], logits.new_empty(0, dtype=torch.int64), [])
    token_ids = []
    for i, seq in enumerate(seqs):
        try:
            out = _sample_rows(sampler, raw[i : i + 1].clone(), [seq], raw[i : i + 1])
        except Exception as e:
            log.exception("request %s failed", seq.request_id)
            result.failed.append((seq, e))
            continue
        result.seqs.append(seq)
        token_ids.append(out.token_ids)
        result.logprobs += out.logprobs
    if token_ids:
        result.token_ids = torch.cat(token_ids)
    return result


def _sample_rows(sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence],
                 raw: torch.Tensor | None = None) -> SamplerOutput:
    apply_penalties(logits, [s.params for s in seqs], [s.token_ids for s in seqs],
                    [s.num_prompt_tokens for s in seqs])
    apply_token_masks(logits, [s.matcher for s in seqs])
    # logprobs are of the model's distribution, before penalties and masks (raw: not written into)
    return sampler(logits, [s.params for s in seqs], [s.generator for s in seqs], raw_logits=raw)
