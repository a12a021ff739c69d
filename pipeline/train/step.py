"""The loss of one micro-batch, computed over chunks of positions.

The student's decoder runs once; its lm_head and the loss then run over
``chunk_size`` positions at a time under activation checkpointing, so the fp32
(positions x vocab) logits exist for one chunk at a time, in the forward and
in the backward pass.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from pipeline.models.head import LogitHead, hidden_states
from pipeline.train.config import LossConfig
from pipeline.train.cross_losses import CROSS_LOSSES
from pipeline.train.losses import cross_entropy, dense_kd, kd_loss, teacher_sparse


@dataclass
class LossFacts:
    """What the loss needs to know about the data."""

    real_vocab: int
    cache_temperature: float
    teacher_vocab: int | None = None
    """A student with another tokenizer (``pipeline.train.align``): the cache tokenizer's real vocabulary."""
    id_map: torch.Tensor | None = None
    """(teacher vocab,) int64: the student id that spells each teacher id (-1: none), for ``gold``."""


def labels_and_masks(batch: dict[str, torch.Tensor]):
    """Next-token labels (B, T) (-100 where none) and the KD and CE masks (B, T) bool.

    Row t is trained where ``loss_mask[t]`` (its next token is a target). Its
    hard label ``input_ids[t + 1]`` exists for t < T - 1; the last row's next
    token opens the following sequence, so only its soft targets are used. A student batch of another tokenizer
    brings its own KD mask (``kd_mask``: the target positions aligned with a teacher position).
    """
    ids = batch["input_ids"]
    mask = batch.get("loss_mask", torch.ones_like(ids, dtype=torch.bool)).bool()
    ce_mask = torch.zeros_like(mask)
    ce_mask[:, :-1] = mask[:, :-1]
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    labels = torch.where(ce_mask, labels, torch.full_like(labels, -100))
    return labels, batch["kd_mask"].bool() if "kd_mask" in batch else mask, ce_mask


def token_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[KD tokens, CE tokens] of a micro-batch, as float64 for exact all-reduce sums."""
    _, kd_mask, ce_mask = labels_and_masks(batch)
    return torch.tensor([kd_mask.sum().item(), ce_mask.sum().item()], dtype=torch.float64)


def micro_batch_sums(model, head: LogitHead, batch: dict[str, torch.Tensor], loss: LossConfig, facts: LossFacts,
                     chunk_size: int, teacher=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed KD and CE losses (fp32 scalars, with gradients) over the valid tokens of one micro-batch."""
    return hidden_sums(hidden_states(model, batch["input_ids"]), head, batch, loss, facts, chunk_size, teacher)


def hidden_sums(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], batch: dict[str, torch.Tensor],
                loss: LossConfig, facts: LossFacts, chunk_size: int, teacher=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``micro_batch_sums`` from the student's (B, T, H) final hidden states; ``head`` maps an (n, H) chunk to (n, V)
    fp32 logits. Given (B, T, V) logits and a head that only casts them, it is the loss of a model's own output."""
    labels, kd_mask, ce_mask = labels_and_masks(batch)
    flat = hidden.reshape(-1, hidden.shape[-1])
    labels, kd_mask, ce_mask = labels.reshape(-1), kd_mask.reshape(-1), ce_mask.reshape(-1)
    temperature = loss.temperature or facts.cache_temperature
    need_kd = loss.kind != "ce" and loss.alpha < 1.0
    need_ce = loss.kind == "ce" or loss.alpha > 0.0  # CE costs a full-vocabulary pass; skip it when unweighted
    teacher_flat = None
    if need_kd and teacher is not None:
        with torch.no_grad():
            teacher_flat = hidden_states(teacher, batch["input_ids"]).reshape(flat.shape[0], -1)
        teacher_head = LogitHead.of(teacher)
    if need_kd and teacher is None:
        width = batch["topk_ids"].shape[-1]
        ids = batch["topk_ids"].reshape(-1, width)
        logprobs = batch["topk_logprobs"].reshape(-1, width)
        tails = batch["tail_logprob"].reshape(-1)
        if "teacher_position" in batch:  # a student of another tokenizer: each position's aligned teacher targets
            at = batch["teacher_position"].reshape(-1)
            ids, logprobs, tails = ids[at], logprobs[at], tails[at]

    def chunk_sums(h: torch.Tensor, lo: int, hi: int):
        logits = head(h)
        ce = torch.zeros((), device=h.device)
        if need_ce:
            ce = (cross_entropy(logits, labels[lo:hi], facts.real_vocab) * ce_mask[lo:hi]).sum()
        if not need_kd:
            return torch.zeros((), device=h.device), ce
        if teacher_flat is not None:
            with torch.no_grad():
                teacher_logits = teacher_head(teacher_flat[lo:hi])[:, : facts.real_vocab]
            per_token = dense_kd(logits[:, : facts.real_vocab], teacher_logits, loss.kind, loss.beta, temperature)
        elif loss.cross_tokenizer:
            t_lp, t_tail = teacher_sparse(ids[lo:hi], logprobs[lo:hi], tails[lo:hi], facts.teacher_vocab,
                                          facts.cache_temperature, temperature)
            per_token = CROSS_LOSSES[loss.cross_tokenizer](logits, ids[lo:hi], t_lp, t_tail, facts.id_map,
                                                           temperature, facts.real_vocab)
        else:
            per_token = kd_loss(logits, ids[lo:hi], logprobs[lo:hi], tails[lo:hi], labels[lo:hi], kind=loss.kind,
                                tail=loss.tail, beta=loss.beta, temperature=temperature,
                                cache_temperature=facts.cache_temperature, real_vocab=facts.real_vocab)
        return (per_token * kd_mask[lo:hi]).sum(), ce

    kd_total = torch.zeros((), device=flat.device)
    ce_total = torch.zeros((), device=flat.device)
    for lo in range(0, flat.shape[0], chunk_size):
        hi = min(lo + chunk_size, flat.shape[0])
        if torch.is_grad_enabled():
            kd, ce = checkpoint(chunk_sums, flat[lo:hi], lo, hi, use_reentrant=False)
        else:
            kd, ce = chunk_sums(flat[lo:hi], lo, hi)
        kd_total, ce_total = kd_total + kd, ce_total + ce
    return kd_total, ce_total


def combine(kd_sum: torch.Tensor, ce_sum: torch.Tensor, kd_tokens: float, ce_tokens: float, loss: LossConfig):
    """``alpha * CE + (1 - alpha) * KD``, each normalised by its valid tokens in the whole step."""
    ce = ce_sum / max(ce_tokens, 1.0)
    if loss.kind == "ce":
        return ce
    kd = kd_sum / max(kd_tokens, 1.0)
    return loss.alpha * ce + (1.0 - loss.alpha) * kd
