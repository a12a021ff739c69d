"""Reduce full-vocabulary logits to sparse soft targets, on the logits' device.

Stage 1 stores ``topk_targets``, ``sample_draws`` and ``hybrid_draws`` of (n, V) float32 logits for n
positions. ``sample_targets`` and ``hybrid_targets`` give the draws as training reads them: ``ids`` (n, W)
int64, ``logprobs`` (n, W) float32 and ``tail`` (n,) float32.
"""
from __future__ import annotations

import numpy as np
import torch


def slot_width(mode: str, top_k: int, samples: int, vocab_size: int) -> int:
    """Stored slots per position: the smallest width that provably holds every id a mode can store."""
    if mode == "topk":
        return top_k
    if mode == "hybrid":
        return top_k + min(samples, vocab_size - top_k)
    return min(samples, vocab_size)


def topk_targets(logits: torch.Tensor, k: int, temperature: float):
    """The k most probable ids (descending), their log-probs at T, and log of the remaining mass.

    The top-k is taken on the raw logits and normalised by one logsumexp,
    which is cheaper than a full log_softmax followed by top-k.
    """
    scaled = logits if temperature == 1.0 else logits / temperature
    values, ids = scaled.topk(k, dim=-1)
    logprobs = values - row_logsumexp(scaled, values[:, :1])
    head = torch.logsumexp(logprobs, dim=-1).clamp(max=0.0)
    tail = torch.log(-torch.expm1(head))  # log(1 - exp(head)), -inf when the head holds all mass
    if k == logits.shape[-1]:
        tail = torch.full_like(tail, -torch.inf)  # exactly empty, not a rounding residue
    return ids, logprobs, tail


def row_logsumexp(logits: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """(n, V) float32 finite logits, (n, 1) their row maxima -> (n, 1) logsumexp.

    Reuses the maximum that top-k already found and exponentiates in place,
    which makes one pass over the logits fewer than ``torch.logsumexp``.
    """
    return row_max + (logits - row_max).exp_().sum(dim=-1, keepdim=True).log_()


def sample_draws(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, width: int):
    """Draw N ids per position from softmax(logits / T) by inverse CDF.

    uniforms: (n, N) float32 in [0, 1), one row per position, so the draws
    depend only on the uniforms and not on how positions are chunked.
    Returns the distinct drawn ids (n, width) int64 in ascending order and how often each was drawn (n, width)
    int32, with id -1 and count 0 in unused slots, last.
    """
    probs = torch.softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
    ids, counts = unique_counts(_inverse_cdf(probs, uniforms))
    return ids[:, :width], counts[:, :width]


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """(n, V) probabilities (unnormalised is fine), (n, N) uniforms -> (n, N) int64 drawn ids."""
    cdf = probs.cumsum(dim=-1)
    # Scale by the row total so float rounding of the cumsum never pushes u past the end.
    targets = (uniforms * cdf[:, -1:]).contiguous()
    return torch.searchsorted(cdf, targets, right=True).clamp_(max=probs.shape[-1] - 1)


def sample_targets(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, width: int):
    """``sample_draws`` as training reads it: ids, float32 log(count / N) (-inf when unused) and tail = -inf."""
    ids, counts = sample_draws(logits, uniforms, temperature, width)
    logprobs = torch.where(counts > 0, torch.log(counts / uniforms.shape[1]), -torch.inf)
    return ids, logprobs, torch.full((len(ids),), -torch.inf, device=logits.device)


def hybrid_draws(logits: torch.Tensor, k: int, uniforms: torch.Tensor, temperature: float, width: int):
    """Exact top-k head plus an unbiased sample of the tail, in ``width`` sample slots.

    The N draws come from the teacher renormalised outside the head; a drawn id's weight is
    ``tail_mass * count / N``, so the expected weights equal the teacher's tail probabilities. Returns
    ``topk_targets``' (head ids, head log-probs, log tail mass) and ``sample_draws``' (ids, counts).
    """
    head_ids, head_logprobs, tail_logprob = topk_targets(logits, k, temperature)
    scaled = logits if temperature == 1.0 else logits / temperature
    rest = torch.softmax(scaled, dim=-1).scatter(1, head_ids, 0.0)
    ids, counts = unique_counts(_inverse_cdf(rest, uniforms))
    return head_ids, head_logprobs, tail_logprob, ids[:, :width], counts[:, :width]


def hybrid_targets(logits: torch.Tensor, k: int, uniforms: torch.Tensor, temperature: float):
    """``hybrid_draws`` as training reads it: width k + N, sampled weights tail + log(count / N), tail -inf."""
    head_ids, head_logprobs, tail_logprob, ids, counts = hybrid_draws(logits, k, uniforms, temperature,
                                                                      uniforms.shape[1])
    logprobs = torch.where(counts > 0, tail_logprob[:, None] + torch.log(counts / uniforms.shape[1]), -torch.inf)
    tail = torch.full_like(tail_logprob, -torch.inf)
    return torch.cat([head_ids, ids], dim=1), torch.cat([head_logprobs, logprobs], dim=1), tail


def unique_counts(draws: torch.Tensor):
    """Row-wise distinct values of (n, N) int64, ascending, with their counts.

    Returns ids (n, N) int64 and counts (n, N) int32, with -1 and 0 in the unused slots, last.
    """
    ordered, _ = draws.sort(dim=1)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = starts.long().cumsum(dim=1) - 1
    counts = torch.zeros(draws.shape, dtype=torch.int32, device=draws.device)
    counts.scatter_add_(1, group, torch.ones_like(counts))
    ids = torch.full_like(ordered, -1).scatter_(1, group, ordered)
    return ids, counts


# The largest float32 below 1: a uniform of exactly 1 would land past the end of the CDF.
BELOW_ONE = 1.0 - 2.0**-24


def sequence_uniforms(seed: int, split_id: int, sequence: int, seq_len: int, draws: int,
                      sampler: str) -> torch.Tensor:
    """(seq_len, draws) float32 uniforms in [0, 1) for one sequence, fixed by (seed, split, sequence index).

    ``multinomial``: independent uniforms, so the draws are i.i.d. ``systematic``: one uniform u per
    position, spread as (j + u) / N for j < N. Each uniform is still uniform on [0, 1), so every draw has
    the teacher's distribution and the weights stay unbiased, but an id of probability p is drawn
    floor(N p) or ceil(N p) times instead of Binomial(N, p) times.
    """
    state = np.random.SeedSequence([seed, split_id, sequence]).generate_state(2, dtype=np.uint64)
    generator = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
    if sampler == "multinomial":
        return torch.rand((seq_len, draws), generator=generator)
    if sampler != "systematic":
        raise ValueError(f"unknown sampler {sampler!r}; choose systematic or multinomial")
    offsets = torch.rand((seq_len, 1), generator=generator, dtype=torch.float64)
    spread = (torch.arange(draws, dtype=torch.float64) + offsets) / draws
    return spread.float().clamp_(max=BELOW_ONE)
