"""Reduce full-vocabulary logits to sparse soft targets, on the logits' device.

The three reductions (``topk_targets``, ``sample_targets``, ``hybrid_targets``)
take (n, V) float32 logits for n positions and return ``ids`` (n, W) int64,
``logprobs`` (n, W) float32 and ``tail`` (n,) float32.
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


def sample_targets(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, width: int):
    """Draw N ids per position from softmax(logits / T) by inverse CDF.

    uniforms: (n, N) float32 in [0, 1), one row per position, so the draws
    depend only on the uniforms and not on how positions are chunked.
    Returns the unique ids by descending count, log(count / N), padding
    id -1 / log-prob -inf, and tail = -inf.
    """
    n, draws = uniforms.shape
    probs = torch.softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
    cdf = probs.cumsum(dim=-1)
    # Scale by the row total so float rounding of the cumsum never pushes u past the end.
    targets = (uniforms * cdf[:, -1:]).contiguous()
    sampled = torch.searchsorted(cdf, targets, right=True).clamp_(max=logits.shape[-1] - 1)
    ids, counts = unique_counts(sampled)
    ids, counts = ids[:, :width], counts[:, :width]
    logprobs = torch.where(counts > 0, torch.log(counts / draws), torch.full_like(counts, -torch.inf))
    tail = torch.full((n,), -torch.inf, device=logits.device)
    return ids, logprobs, tail


def hybrid_targets(logits: torch.Tensor, k: int, uniforms: torch.Tensor, temperature: float):
    """Exact top-k head plus an unbiased sample of the tail; returns width k + N.

    The N draws come from the teacher renormalised outside the head; each
    unique drawn id gets weight ``tail_mass * count / N``, so the expected
    weights equal the teacher's tail probabilities and ``tail`` is -inf.
    """
    n, draws = uniforms.shape
    scaled = logits if temperature == 1.0 else logits / temperature
    head_ids, head_logprobs, tail_logprob = topk_targets(logits, k, temperature)
    rest = torch.softmax(scaled, dim=-1).scatter(1, head_ids, 0.0)
    cdf = rest.cumsum(dim=-1)
    sampled = torch.searchsorted(cdf, (uniforms * cdf[:, -1:]).contiguous(), right=True).clamp_(max=logits.shape[-1] - 1)
    ids, counts = unique_counts(sampled)
    logprobs = torch.where(counts > 0, tail_logprob[:, None] + torch.log(counts / draws),
                           torch.full_like(counts, -torch.inf))
    tail = torch.full((n,), -torch.inf, device=logits.device)
    return torch.cat([head_ids, ids], dim=1), torch.cat([head_logprobs, logprobs], dim=1), tail


def unique_counts(draws: torch.Tensor):
    """Row-wise unique values of (n, N) int64 with their counts, by descending count.

    Returns ids (n, N) with -1 in unused slots, and counts (n, N) float32.
    """
    ordered, _ = draws.sort(dim=1)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = starts.long().cumsum(dim=1) - 1
    counts = torch.zeros(draws.shape, dtype=torch.float32, device=draws.device)
    counts.scatter_add_(1, group, torch.ones_like(counts))
    ids = torch.full_like(ordered, -1).scatter_(1, group, ordered)
    counts, order = counts.sort(dim=1, descending=True, stable=True)
    return ids.gather(1, order), counts


def sequence_uniforms(seed: int, split_id: int, sequence: int, seq_len: int, draws: int) -> torch.Tensor:
    """(seq_len, draws) float32 uniforms for one sequence, fixed by (seed, split, sequence index)."""
    state = np.random.SeedSequence([seed, split_id, sequence]).generate_state(2, dtype=np.uint64)
    generator = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
    return torch.rand((seq_len, draws), generator=generator)
