"""Repetition, presence and frequency penalties, applied to the logits before sampling (greedy included).

Semantics as in vLLM: the repetition penalty (CTRL / Hugging Face) covers tokens of the prompt and the output,
presence and frequency penalties cover the output only. The engine applies them before the sampler; requested
logprobs describe the model's distribution before them (braidinfer.sampling.logits), as vLLM's do by default.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from braidinfer.sampling_params import SamplingParams


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams], token_ids: Sequence[Sequence[int]],
                    num_prompt_tokens: Sequence[int]) -> None:
    """In place. logits: [B, vocab]; for row i, token_ids[i] is prompt + output so far, the first
    num_prompt_tokens[i] of them the prompt. Rows without penalties are untouched."""
    vocab = logits.shape[-1]
    for i, p in enumerate(params):
        if not p.penalized:
            continue
        ids = torch.tensor(token_ids[i], dtype=torch.int64, device=logits.device)
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
            seen[ids] = True
            # within [1e-6, 1e6]: float32 holds any logit scaled by it (1e-46 would be 0, a division by it inf)
            penalty = min(max(p.repetition_penalty, 1e-6), 1e6)
            scaled = torch.where(row > 0, row / penalty, row * penalty)
            row.copy_(torch.where(seen, scaled, row))
        if p.presence_penalty or p.frequency_penalty:
            counts = torch.bincount(ids[num_prompt_tokens[i]:], minlength=vocab)[:vocab].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
