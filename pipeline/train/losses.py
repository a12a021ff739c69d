"""Distillation losses on sparse cached targets. Tensors in, tensors out; everything in fp32.

Shapes, for N positions, vocab V and W stored slots:
  student_logits (N, V) any float dtype; ids (N, W) int64 with -1 in unused slots;
  teacher_logprobs (N, W) float; teacher_tail (N,) float (log of the mass outside ``ids``);
  labels (N,) int64 with -100 where there is no next token.
Every loss returns a per-position (N,) float32 tensor; callers mask and sum it, and
divide by the number of valid tokens of the whole (accumulated) batch.

No loss builds a dense teacher distribution. The student's log-probs at the
stored ids come from one logsumexp and a gather; its tail is
``log1p(-sum(exp(stored log-probs)))``, not a scatter over the vocabulary.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

NEG_INF = float("-inf")
TAIL_FLOOR = 1e-6  # the student's tail mass is kept above this so its log and gradient stay finite


def _safe_kl_terms(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """Per-entry p * (log p - log q), zero where p == 0, with finite gradients everywhere."""
    present = p_log > NEG_INF
    p_log_safe = torch.where(present, p_log, torch.zeros_like(p_log))
    q_log_safe = torch.where(present, q_log, torch.zeros_like(q_log))
    return torch.where(present, p_log_safe.exp() * (p_log_safe - q_log_safe), torch.zeros_like(p_log))


def log_tail(stored_logprobs: torch.Tensor) -> torch.Tensor:
    """(N, W) log-probs -> (N,) log of the remaining mass, floored at TAIL_FLOOR."""
    head = torch.exp(torch.logsumexp(stored_logprobs, dim=-1))
    return torch.log1p(-head.clamp(max=1.0 - TAIL_FLOOR))


def student_sparse(student_logits: torch.Tensor, ids: torch.Tensor, real_vocab: int, temperature: float = 1.0):
    """Student log-probs at ``ids`` (N, W) (-inf in unused slots), its tail (N,), and its full logsumexp (N,)."""
    logits = student_logits.float()
    if real_vocab < logits.shape[-1]:
        logits = logits[:, :real_vocab]
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    valid = (ids >= 0) & (ids < real_vocab)
    picked = logits.gather(-1, torch.where(valid, ids, torch.zeros_like(ids))) - lse[:, None]
    picked = torch.where(valid, picked, torch.full_like(picked, NEG_INF))
    return picked, log_tail(picked), lse


def teacher_sparse(ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor, real_vocab: int,
                   cache_temperature: float = 1.0, temperature: float = 1.0):
    """Teacher log-probs (N, W) and tail (N,): out-of-vocab ids folded into the tail, re-tempered if asked.

    Re-tempering raises the stored probabilities to the power T_cache / T and
    renormalises over the stored ids plus the tail, treated as one bucket.
    """
    logprobs, tail = logprobs.float(), tail.float()
    invalid = (ids < 0) | (ids >= real_vocab)
    dropped = torch.logsumexp(torch.where(invalid, logprobs, torch.full_like(logprobs, NEG_INF)), dim=-1)
    tail = torch.logaddexp(tail, dropped)
    logprobs = torch.where(invalid, torch.full_like(logprobs, NEG_INF), logprobs)
    if temperature != cache_temperature:
        scale = cache_temperature / temperature
        logprobs, tail = logprobs * scale, tail * scale
        norm = torch.logaddexp(torch.logsumexp(logprobs, dim=-1), tail)
        logprobs, tail = logprobs - norm[:, None], tail - norm
    return logprobs, tail


def with_bucket(logprobs: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """(N, W) and (N,) -> (N, W + 1): the stored entries plus one tail bucket."""
    return torch.cat([logprobs, tail[:, None]], dim=-1)


def renormalized(logprobs: torch.Tensor) -> torch.Tensor:
    """Log-probs renormalised over the stored entries."""
    return logprobs - torch.logsumexp(logprobs, dim=-1, keepdim=True)


def forward_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last axis of two (N, E) log-prob tensors."""
    return _safe_kl_terms(p, q).sum(-1)


def reverse_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(q || p) over the last axis."""
    return _safe_kl_terms(q, p).sum(-1)


def jsd(p: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised JSD (GKD): beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q.

    As in GKD, beta = 0 is taken as KL(p||q) and beta = 1 as KL(q||p), the
    limits of the divergence divided by its vanishing weight.
    """
    if beta == 0.0:
        return forward_kl(p, q)
    if beta == 1.0:
        return reverse_kl(p, q)
    # Where both sides are empty, logaddexp(-inf, -inf) has a NaN gradient: take m there from finite stand-ins.
    absent = torch.isneginf(p) & torch.isneginf(q)
    m = torch.logaddexp(p.masked_fill(absent, 0.0) + math.log(beta), q.masked_fill(absent, 0.0) + math.log(1.0 - beta))
    m = m.masked_fill(absent, NEG_INF)
    return beta * _safe_kl_terms(p, m).sum(-1) + (1.0 - beta) * _safe_kl_terms(q, m).sum(-1)


class SparsePair(NamedTuple):
    """The student's and the teacher's log-probs at the stored ids, with what the tail treatments need."""

    s_lp: torch.Tensor
    """(N, W) the student's log-probs at the stored ids (at the loss temperature)."""
    s_tail: torch.Tensor
    """(N,) log of the student's mass outside the stored ids."""
    t_lp: torch.Tensor
    """(N, W) the teacher's log-probs at the stored ids."""
    t_tail: torch.Tensor
    """(N,) log of the teacher's mass outside them."""
    ids: torch.Tensor
    labels: torch.Tensor
    at_label: Callable[[], torch.Tensor]
    """(N,) the student's log-prob of the true next token, computed only by the tail treatment that needs it."""


def _bucket(pair: SparsePair, on_support: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One extra bucket on each side holds the mass outside the stored ids. Where the teacher's tail is empty, a
    divergence ``on_support`` compares the student renormalised over the stored ids instead."""
    p, q = with_bucket(pair.t_lp, pair.t_tail), with_bucket(pair.s_lp, pair.s_tail)
    return p, _on_support(p, q, pair.s_lp) if on_support else q


def _on_support(p: torch.Tensor, q: torch.Tensor, s_lp: torch.Tensor) -> torch.Tensor:
    """(N, W + 1) student ``q`` whose last entry holds mass outside the stored ids: where the teacher's ``p``
    puts none there, the student renormalised over the stored ids instead, with nothing in that entry."""
    empty = torch.isneginf(p[:, -1:])
    return torch.where(empty, with_bucket(renormalized(s_lp), torch.full_like(s_lp[:, 0], NEG_INF)), q)


def _ground_truth(pair: SparsePair, on_support: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the teacher's tail mass onto the true next token (a new entry, or merged with a stored one)."""
    t_lp, t_tail, ids, labels = pair.t_lp, pair.t_tail, pair.ids, pair.labels
    has_label = labels >= 0
    match = (ids == labels[:, None]) & has_label[:, None]
    merged = torch.where(match, torch.logaddexp(t_lp, t_tail[:, None]), t_lp)
    extra_t = torch.where(match.any(-1), torch.full_like(t_tail, NEG_INF), t_tail)
    extra_s = torch.where(has_label & ~match.any(-1), pair.at_label(), pair.s_tail)
    p, q = torch.cat([merged, extra_t[:, None]], -1), torch.cat([pair.s_lp, extra_s[:, None]], -1)
    return p, _on_support(p, q, pair.s_lp) if on_support else q


def _renormalize(pair: SparsePair, on_support: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the tails: both sides renormalised over the stored ids."""
    return renormalized(pair.t_lp), renormalized(pair.s_lp)


TAILS: dict[str, Callable[[SparsePair, bool], tuple[torch.Tensor, torch.Tensor]]] = {
    "bucket": _bucket, "ground_truth": _ground_truth, "renormalize": _renormalize}
"""``loss.tail``: how the mass outside the stored ids enters the loss; each gives the (N, E) pair (p, q)."""


class Divergence(NamedTuple):
    between: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    """(p, q, beta) -> (N,): the divergence of two (N, E) log-prob tensors, teacher p and student q."""
    on_support: bool
    """Where the teacher's tail is empty, compare the student renormalised over the stored ids (the teacher
    puts no mass outside them, and a divergence weighted by the student would charge the student's tail)."""


DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": Divergence(lambda p, q, beta: forward_kl(p, q), on_support=False),
    "reverse_kl": Divergence(lambda p, q, beta: reverse_kl(p, q), on_support=True),
    "jsd": Divergence(jsd, on_support=True),
}
"""``loss.kind``: the divergences a KD loss can take; adding one is adding an entry."""


def kd_loss(student_logits: torch.Tensor, ids: torch.Tensor, teacher_logprobs: torch.Tensor,
            teacher_tail: torch.Tensor, labels: torch.Tensor, *, kind: str = "forward_kl", tail: str = "bucket",
            beta: float = 0.5, temperature: float = 1.0, cache_temperature: float = 1.0,
            real_vocab: int | None = None) -> torch.Tensor:
    """Per-position (N,) KD loss at ``temperature``, already scaled by temperature squared (Hinton).

    ``kind`` names a ``DIVERGENCES`` entry and ``tail`` a ``TAILS`` entry.
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown KD loss kind {kind!r}; choose {', '.join(DIVERGENCES)}")
    if tail not in TAILS:
        raise ValueError(f"unknown loss.tail {tail!r}; choose {', '.join(TAILS)}")
    real_vocab = real_vocab or student_logits.shape[-1]
    s_lp, s_tail, lse = student_sparse(student_logits, ids, real_vocab, temperature)
    t_lp, t_tail = teacher_sparse(ids, teacher_logprobs, teacher_tail, real_vocab, cache_temperature, temperature)

    def at_label() -> torch.Tensor:
        safe = labels.clamp(min=0, max=real_vocab - 1)
        return student_logits.float().gather(-1, safe[:, None])[:, 0] / temperature - lse

    divergence = DIVERGENCES[kind]
    p, q = TAILS[tail](SparsePair(s_lp, s_tail, t_lp, t_tail, ids, labels, at_label), divergence.on_support)
    return divergence.between(p, q, beta) * temperature**2


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor, real_vocab: int | None = None) -> torch.Tensor:
    """Per-position (N,) -log q(label) in fp32; 0 where labels < 0."""
    logits = student_logits.float()
    if real_vocab is not None and real_vocab < logits.shape[-1]:
        logits = logits[:, :real_vocab]
    valid = labels >= 0
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    nll = torch.logsumexp(logits, -1) - logits.gather(-1, safe[:, None])[:, 0]
    return torch.where(valid, nll, torch.zeros_like(nll))


def dense_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward_kl", beta: float = 0.5,
             temperature: float = 1.0) -> torch.Tensor:
    """Per-position (N,) ``DIVERGENCES[kind]`` over the full vocabulary, times T^2: the online references, where
    a live teacher gives whole distributions. (N, V) logits of both models, over the same V."""
    t = torch.log_softmax(teacher_logits.float() / temperature, -1)
    s = torch.log_softmax(student_logits.float() / temperature, -1)
    return DIVERGENCES[kind].between(t, s, beta) * temperature**2
