"""Picks the next token of every row of a batch from its logits and sampling parameters."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from braidinfer.sampling_params import SamplingParams

_U64_MASK = (1 << 64) - 1

# Rows whose top_k is at most this are filtered from a partial top-k selection instead of a full
# sort of the vocabulary.
_MAX_TOP_K_CANDIDATES = 1024
_MAX_TEMPERATURE = 1e6  # see _temperature


ARGMAX_CHUNK = 256  # vocabulary entries per chunk of greedy_ids' first pass
TWO_PASS_ARGMAX_MAX_ROWS = 48  # the most rows for which greedy_ids takes the two passes


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1) of [B, vocab] logits. On CUDA, where vocab is a multiple of ARGMAX_CHUNK and B is at
    most TWO_PASS_ARGMAX_MAX_ROWS, in two passes (two_pass_argmax): torch's one-pass argmax over a row of Llama 3's
    128,256 bf16 logits took 37 us on an H200, a kernel that spreads one row over few threads, where the two passes
    are short, parallel reductions. Their time grows with the rows, argmax's hardly: on an H100, at 128,256 logits,
    they took 0.38x argmax's GPU time at one row, 0.87-0.92x at 48, 1.03-1.12x at 64 and 1.8x at 256."""
    batch, vocab = logits.shape
    if logits.is_cuda and vocab % ARGMAX_CHUNK == 0 and vocab >= 4 * ARGMAX_CHUNK and batch <= TWO_PASS_ARGMAX_MAX_ROWS:
        return two_pass_argmax(logits)
    return logits.argmax(dim=-1)


def two_pass_argmax(logits: torch.Tensor) -> torch.Tensor:
    """argmax(dim=-1) of [B, vocab] logits, vocab a multiple of ARGMAX_CHUNK: the maximum and its position in each
    chunk of ARGMAX_CHUNK entries, then the first chunk holding the largest. Both passes return the first of equal
    maxima, so ties resolve to the lowest id, as argmax's do."""
    batch, vocab = logits.shape
    values, positions = logits.view(batch, vocab // ARGMAX_CHUNK, ARGMAX_CHUNK).max(dim=-1)  # [B, chunks] each
    chunk = values.argmax(dim=-1, keepdim=True)  # [B, 1]
    return positions.gather(1, chunk).squeeze(1).add_(chunk.squeeze(1), alpha=ARGMAX_CHUNK)


@dataclass
class TokenLogprobs:
    """Log-probabilities reported for one sampled token.

    `top` holds the `SamplingParams.logprobs` most likely (token id, logprob) pairs, most likely first.
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class SamplerOutput:
    """token_ids: [B] int64 on the logits' device; logprobs: one entry per row, None where not requested."""

    token_ids: torch.Tensor
    logprobs: list[TokenLogprobs | None]


class HostTokens:
    """Sampled token ids on their way to the host: the copy is queued at construction, `get` waits for it.

    On CUDA they come through pinned memory and the wait is on an event, which releases the GIL: threads reading the
    streams run while the GPU finishes (a blocking copy would hold it), and the engine can queue the next step first.
    """

    def __init__(self, token_ids: torch.Tensor):
        self.device_ids = token_ids
        self._copied: torch.cuda.Event | None = None
        if token_ids.device.type == "cuda":
            self._host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
            self._host.copy_(token_ids, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self._host = token_ids

    def get(self) -> list[int]:
        """The token ids as a list, once the copy has landed."""
        if self._copied is not None:
            self._copied.synchronize()
        return self._host.tolist()


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on `device` seeded with `seed` (any int; negative seeds wrap to 64 bits)."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed & _U64_MASK)
    return generator


class Sampler:
    """Greedy, temperature, top-k, top-p and min-p sampling, vectorised over the batch."""

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator],
        raw_logits: torch.Tensor | None = None,
    ) -> SamplerOutput:
        """Pick one token per row.

        logits: [B, vocab], any float dtype. params, generators: B each; the generators live on the
        logits' device and may be shared between rows. Greedy rows take the argmax: of the logits as
        they are when every row is greedy and none wants logprobs (the float32 copy that everything
        else computes in is exact for bf16/fp16, so it has the same argmax). Other rows divide by the
        temperature, keep the top-k tokens, then the smallest set whose probability reaches top-p (at
        least one token), then the tokens whose probability is at least min-p times the largest, and
        draw from what is left with the row's generator.
        Logprobs are of the model's own distribution (log_softmax of `raw_logits`, the logits before penalties and
        grammar masks changed them, as vLLM reports them; `logits` when not given): before temperature and filters.
        """
        if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(generators):
            raise ValueError(
                f"logits {tuple(logits.shape)} need one row per SamplingParams ({len(params)}) "
                f"and per generator ({len(generators)})"
            )
        if all(p.greedy and p.logprobs is None for p in params):
            # No float32 copy: bf16/fp16 -> float32 is exact, so the argmax is the same (and a ~4 us kernel saved
            # per decode step on an H100). A Triton argmax (3.5 us against torch's 9.3, at a smaller vocabulary) was
            # tried and dropped: its Python launch cost more host time per step than it saved on the GPU.
            return SamplerOutput(token_ids=greedy_ids(logits), logprobs=[None] * len(params))
        if raw_logits is None or raw_logits is logits:
            raw_logits = logits = logits.float()
        else:
            logits, raw_logits = logits.float(), raw_logits.float()
        token_ids = greedy_ids(logits)
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sampled_rows:
            self._sample_rows(logits, token_ids, params, generators, sampled_rows)
        return SamplerOutput(token_ids=token_ids, logprobs=_logprobs(raw_logits, token_ids, params))

    def _sample_rows(
        self,
        logits: torch.Tensor,
        token_ids: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator],
        rows: list[int],
    ) -> None:
        """Overwrite token_ids[rows] with tokens drawn from the filtered distributions of those rows."""
        if len(rows) == len(params):
            row_logits = logits
        else:
            row_index = _on_device(rows, torch.int64, logits.device)
            row_logits = logits.index_select(0, row_index)
        row_params = [params[i] for i in rows]
        probs = _filtered_probs(row_logits, row_params)
        noise = _exponential_noise(probs, [generators[i] for i in rows])
        # argmax(p_i / E_i) with E_i ~ Exp(1) picks token i with probability p_i (the smallest of
        # independent Exp(p_i) variables), without a host sync or a cumulative-sum search.
        drawn = probs.div_(noise).argmax(dim=-1)
        if len(rows) == len(params):
            token_ids.copy_(drawn)
        else:
            token_ids.index_copy_(0, row_index, drawn)


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[S, vocab] float32 probabilities after temperature, top-k, top-p and min-p."""
    vocab = logits.shape[-1]
    # One host-to-device copy for all four per-row settings.
    settings = _on_device([[_temperature(p), _top_k(p, vocab), p.top_p, p.min_p] for p in params], torch.float32,
                          logits.device)
    temperature, top_k, top_p, min_p = settings.unbind(dim=1)
    scaled = logits / temperature.unsqueeze(1)
    removed: torch.Tensor | None = None  # no mask at all while no row filters
    filtered_rows = [_top_k(p, vocab) < vocab or p.top_p < 1.0 for p in params]
    if any(filtered_rows):
        candidates = _candidate_count(params, filtered_rows, vocab)
        top_k = top_k.long()
        if (candidates == vocab > _MAX_TOP_K_CANDIDATES and logits.device.type == "cpu"
                and _may_fit(params, filtered_rows, vocab)):
            # The CPU sorts a vocabulary slowly (4.2 ms at 49k tokens, one thread): first look for the nuclei
            # among the most likely tokens, where they nearly always are.
            removed = _top_k_top_p_removed(scaled, top_k, top_p, _MAX_TOP_K_CANDIDATES, whole_rows=True)
        if removed is None:
            removed = _top_k_top_p_removed(scaled, top_k, top_p, candidates)
    if any(p.min_p > 0.0 for p in params):
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p). The ratio to the most likely
        # token does not change when top-k/top-p renormalise, so this mask composes with theirs.
        threshold = scaled.amax(dim=-1, keepdim=True) + min_p.log().unsqueeze(1)
        below = scaled < threshold
        removed = below if removed is None else removed | below
    if removed is not None:
        scaled.masked_fill_(removed, float("-inf"))
    return torch.softmax(scaled, dim=-1)


def _temperature(params: SamplingParams) -> float:
    """The temperature, at most 1e6: a larger one could be infinite in float32 (a forbidden token's -inf / inf is
    NaN, and the row with it), and the distribution at 1e6 is uniform over the allowed tokens within float32's
    resolution. (Below GREEDY_TEMPERATURE a request is greedy and never divides.)"""
    return min(params.temperature, _MAX_TEMPERATURE)


def _top_k(params: SamplingParams, vocab: int) -> int:
    """top_k as a count of tokens kept: the whole vocabulary when off."""
    return vocab if params.top_k <= 0 else min(params.top_k, vocab)


def _candidate_count(params: list[SamplingParams], filtered_rows: list[bool], vocab: int) -> int:
    """How many of the most likely tokens per row can survive top-k and top-p: the whole vocabulary
    unless every filtered row has a top-k of at most _MAX_TOP_K_CANDIDATES.

    A partial top-k selection is far cheaper than sorting a 150k vocabulary, and top-p only ever
    looks at what top-k kept.
    """
    ks = [_top_k(p, vocab) for p, filtered in zip(params, filtered_rows) if filtered]
    return max(ks) if max(ks) <= _MAX_TOP_K_CANDIDATES else vocab


def _may_fit(params: list[SamplingParams], filtered_rows: list[bool], vocab: int) -> bool:
    """Whether every filtered row keeps at most _MAX_TOP_K_CANDIDATES tokens by its top-k or has top-k off (a
    top-p row's nucleus may then lie among that many most likely tokens: `whole_rows`)."""
    return all(_top_k(p, vocab) <= _MAX_TOP_K_CANDIDATES or _top_k(p, vocab) == vocab
               for p, filtered in zip(params, filtered_rows) if filtered)


def _top_k_top_p_removed(
    scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, candidates: int, whole_rows: bool = False
) -> torch.Tensor | None:
    """[S, vocab] bool: tokens outside the top-k, or outside the top-p nucleus of what top-k kept.

    Only the `candidates` most likely tokens of each row are examined; rows with neither filter
    (top_k == vocab, top_p == 1) keep every token. Every filtered row must keep at most `candidates` tokens by its
    top-k, unless `whole_rows` (host syncs: for the CPU): then a row with top-k off has its probabilities normalised
    over the whole row, and None comes back when such a row's top-p nucleus reaches past the candidates.
    """
    vocab = scaled.shape[-1]
    if candidates < vocab:
        sorted_logits, order = scaled.topk(candidates, dim=-1, sorted=True)
    else:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
    # Top-k keeps every token tied with the k-th largest logit (as Hugging Face's top-k does), so that top_k=1
    # draws among the argmax ties (bf16 logits tie often); a row keeping all candidates removes none of them.
    kth = sorted_logits.gather(1, (top_k.clamp(max=candidates) - 1).unsqueeze(1))
    removed_sorted = sorted_logits < kth
    masked = sorted_logits.masked_fill(removed_sorted, float("-inf"))
    if whole_rows:
        whole = top_k >= vocab
        norm = torch.where(whole, scaled.logsumexp(dim=-1), masked.logsumexp(dim=-1))
        sorted_probs = (masked - norm.unsqueeze(1)).exp_()
        if bool((whole & (top_p < 1.0) & (sorted_probs.sum(dim=-1) < top_p)).any()):
            return None
    else:
        sorted_probs = torch.softmax(masked, dim=-1)
    # A token stays in the nucleus while the probability before it is still short of top_p. Rows with top_p == 1
    # skip the test so that float32 rounding of the cumulative sum cannot cut their tail. The first token always
    # stays: a top_p below float32's range is 0 here, which would remove it too.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    removed_sorted |= (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    removed_sorted[:, 0] = False
    # Tokens outside the candidates start out removed, except, in a row without top-p, the ties of its k-th logit
    # (top-k alone is a threshold; a top-p row's nucleus, computed over the candidates, breaks those ties by order).
    removed = torch.ones_like(scaled, dtype=torch.bool).scatter_(1, order, removed_sorted)
    removed &= (scaled < kth) | (top_p < 1.0).unsqueeze(1)
    filtered = (top_k < vocab) | (top_p < 1.0)
    return removed & filtered.unsqueeze(1)


def _exponential_noise(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """[S, vocab] Exp(1) noise; row i drawn from generators[i], one draw per distinct generator."""
    noise = torch.empty_like(probs)
    rows_by_generator: dict[int, list[int]] = {}
    for row, generator in enumerate(generators):
        rows_by_generator.setdefault(id(generator), []).append(row)
    for rows in rows_by_generator.values():
        generator = generators[rows[0]]
        if len(rows) == 1:
            # A row with its own generator consumes the same numbers wherever it sits in the batch,
            # so a seeded request samples the same tokens whatever it is batched with.
            _exponential_(noise[rows[0]], generator)
        elif len(rows) == len(generators):  # every row: the same draws as a block scattered to rows 0..S-1
            _exponential_(noise, generator)
        else:
            block = torch.empty((len(rows), probs.shape[-1]), device=probs.device)
            noise[_on_device(rows, torch.int64, probs.device)] = _exponential_(block, generator)
    # CUDA's Exp(1) can come out as exactly 0, which would turn p/E into inf (or NaN for a removed token).
    return noise.clamp_min_(torch.finfo(torch.float32).tiny)


def _exponential_(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """t filled in place with Exp(1) draws from generator. On the CPU as -log(U) of float32 uniforms, U raised to the
    smallest normal float first (U = 0 would give E = inf, so p / E = 0 for a token that survived the filters: in a
    row with one survivor, argmax would then pick a removed token), since torch's exponential_ there takes ~6x as long
    (0.88 against 0.16 ms for 49,152 draws on one thread: most of a sampled token's sampling time); on CUDA its one
    kernel."""
    if t.device.type == "cpu":
        return t.uniform_(generator=generator).clamp_min_(torch.finfo(torch.float32).tiny).log_().neg_()
    return t.exponential_(generator=generator)


def _on_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on `device`, copied without waiting for the device's queued work (a blocking
    host-to-device copy synchronises the stream: the host would wait for the step's forward, and asynchronous
    scheduling could not queue the next step behind it)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]
) -> list[TokenLogprobs | None]:
    """Raw-distribution logprobs of the chosen tokens (and top-n) for the rows that asked for them."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    result: list[TokenLogprobs | None] = [None] * len(params)
    if not rows:
        return result
    row_index = torch.tensor(rows, device=logits.device)
    logprobs = torch.log_softmax(logits.index_select(0, row_index), dim=-1)
    chosen = token_ids.index_select(0, row_index)
    chosen_logprob = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
    n = min(max(params[i].logprobs for i in rows), logits.shape[-1])
    top_logprob, top_id = logprobs.topk(n, dim=-1)
    # Host copies only of the [R] and [R, n] results, and only for the rows that asked.
    chosen_l, chosen_lp_l, top_id_l, top_lp_l = (
        t.tolist() for t in (chosen, chosen_logprob, top_id, top_logprob)
    )
    for k, row in enumerate(rows):
        wanted = params[row].logprobs
        top = list(zip(top_id_l[k][:wanted], top_lp_l[k][:wanted]))
        result[row] = TokenLogprobs(token_id=chosen_l[k], logprob=chosen_lp_l[k], top=top)
    return result
