"""Cross-tokenizer distillation losses (ULD, GOLD) on sparse cached targets, when teacher and student vocabularies differ.

Shapes, for N aligned positions, student vocab V_s, teacher vocab V_t and W stored slots:
  student_logits (N, V_s) any float dtype; t_ids (N, W) int64 teacher ids, -1 in unused slots;
  t_lp (N, W) float teacher log-probs, -inf in unused slots, in no particular order; t_tail (N,) float, the log of
  the teacher's mass outside the stored entries; id_map (V_t,) int64, teacher id -> student id spelling the same
  bytes, or -1. The teacher is already re-tempered (``losses.teacher_sparse``); ``temperature`` divides the
  student's logits only, and the result is multiplied by temperature squared, as ``losses.kd_loss`` does.
Every loss returns a per-position (N,) float32 tensor.

Teacher and student ids name different strings, so ULD compares the two distributions rank by rank (sorted
probabilities) instead of id by id. On a sparse teacher only its W stored entries and one tail bucket are known:
the student's top-W probabilities are compared with the stored ones, and the remaining masses with each other.
"""
from __future__ import annotations

import torch

from pipeline.train.losses import NEG_INF, forward_kl


def _student_log_probs(student_logits: torch.Tensor, temperature: float, real_vocab: int | None) -> torch.Tensor:
    """(N, V_s) fp32 log-softmax of the student at ``temperature``, padding rows (ids >= real_vocab) sliced off."""
    logits = student_logits.float()
    if real_vocab is not None and real_vocab < logits.shape[-1]:
        logits = logits[:, :real_vocab]
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def _sparse_sorted_l1(t_p: torch.Tensor, t_rest: torch.Tensor, s_p: torch.Tensor, s_rest: torch.Tensor) -> torch.Tensor:
    """(N,) sum_i |p_(i) - q_(i)| over the top W ranks, plus |t_rest - s_rest| for the ranks beyond.

    t_p (N, W) teacher probabilities (0 in unused slots, any order); t_rest (N,) teacher mass outside them.
    s_p (N, V) student probabilities (0 where excluded); s_rest (N,) student mass left to split between its
    top W and its tail, so that its tail is s_rest minus the top W, clamped at 0 against rounding.
    Beyond rank W, sum_{i>W} |p_(i) - q_(i)| >= |sum_{i>W} p_(i) - sum_{i>W} q_(i)| (triangle inequality), so the tail
    term is a lower bound of the exact sorted distance there when the stored entries are the teacher's top W, and
    exact when the teacher's tail is empty (its ranks beyond W are then all 0).
    """
    width = t_p.shape[-1]
    k = min(width, s_p.shape[-1])
    t_sorted = t_p.sort(dim=-1, descending=True).values
    s_top = s_p.topk(k, dim=-1).values  # differentiable: gradients flow to the picked entries
    s_tail = (s_rest - s_top.sum(-1)).clamp(min=0.0)
    if k < width:  # fewer student ids than stored slots: the missing ranks hold probability 0
        s_top = torch.nn.functional.pad(s_top, (0, width - k))
    return (t_sorted - s_top).abs().sum(-1) + (t_rest - s_tail).abs()


def uld(student_logits: torch.Tensor, t_lp: torch.Tensor, t_tail: torch.Tensor, temperature: float = 1.0,
        real_vocab: int | None = None) -> torch.Tensor:
    """Per-position (N,) Universal Logit Distillation (Boizard et al. 2024), times T^2.

    ULD is the L1 distance between the two probability vectors, each sorted in descending order and zero-padded to
    one length. Here: the teacher's W stored probabilities sorted against the student's top-W, plus
    |tail_t - tail_s| with tail_t = exp(t_tail) and tail_s = 1 - (student's top-W mass), clamped at 0. That term
    bounds the distance over the ranks beyond W from below (see ``_sparse_sorted_l1``); with W >= both
    vocabularies and an empty teacher tail the result is the exact ULD (an empty tail makes it exact for any W,
    against the stored distribution). An empty row (no stored entry, tail -inf) gives 1, finite.
    """
    s_p = _student_log_probs(student_logits, temperature, real_vocab).exp()
    ones = torch.ones_like(s_p[:, 0])
    return _sparse_sorted_l1(t_lp.float().exp(), t_tail.float().exp(), s_p, ones) * temperature**2


def gold(student_logits: torch.Tensor, t_ids: torch.Tensor, t_lp: torch.Tensor, t_tail: torch.Tensor,
         id_map: torch.Tensor, temperature: float = 1.0, real_vocab: int | None = None) -> torch.Tensor:
    """Per-position (N,) GOLD hybrid loss (TRL's ``uld_use_hybrid_loss``), times T^2.

    Stored teacher entries whose id maps to a student id m(i) (``id_map``; one that lands on a padding row counts as
    unmapped) are compared id by id: sum_i p_i (log p_i - log q_m(i)), the forward-KL terms (TRL's matched term is
    its generalised JSD, of which this is beta = 0), zero where p_i = 0. The rest is ULD as in ``uld``: the
    teacher's unmatched stored probabilities plus its whole tail (the tail's ids are unknown, so it counts as
    unmatched) against the student's probabilities with the images m(i) of this position's matched entries set to
    0, not renormalised; the student's tail is 1 - matched mass - top-W unmatched mass. Matched and unmatched parts
    are added with weights 1 and 1 (TRL with both ``uld_hybrid_*_weight`` set to 1; left unset, TRL weights them
    by vocabulary overlap instead).

    Assumes each row's stored ids are distinct and ``id_map`` is injective (tokens spelling the same bytes are
    unique in each vocabulary), so no two matched entries of a row share a student id.
    """
    s_lp = _student_log_probs(student_logits, temperature, real_vocab)
    n, vocab = s_lp.shape
    t_lp = t_lp.float()
    known = (t_ids >= 0) & (t_ids < id_map.shape[0])
    mapped = id_map[torch.where(known, t_ids, torch.zeros_like(t_ids))]
    matched = known & (mapped >= 0) & (mapped < vocab)
    # Unmatched slots gather column 0 as a placeholder; forward_kl's -inf teacher side zeroes them and their gradient.
    target = torch.where(matched, mapped, torch.zeros_like(mapped))
    p_matched = torch.where(matched, t_lp, torch.full_like(t_lp, NEG_INF))
    kl = forward_kl(p_matched, s_lp.gather(-1, target))

    # Matched images go to a spare column `vocab`, dropped afterwards, so one scatter needs no bounds check.
    hit = torch.zeros(n, vocab + 1, dtype=torch.bool, device=s_lp.device)
    hit = hit.scatter(-1, torch.where(matched, mapped, torch.full_like(mapped, vocab)), True)[:, :vocab]
    s_p = s_lp.exp()
    s_unmatched = s_p.masked_fill(hit, 0.0)
    s_rest = 1.0 - (s_p - s_unmatched).sum(-1)
    t_unmatched = torch.where(matched, torch.zeros_like(t_lp), t_lp.exp())
    sorted_l1 = _sparse_sorted_l1(t_unmatched, t_tail.float().exp(), s_unmatched, s_rest)
    return (kl + sorted_l1) * temperature**2


def _uld_by_ids(student_logits, t_ids, t_lp, t_tail, id_map, temperature=1.0, real_vocab=None) -> torch.Tensor:
    """``uld`` called as ``gold`` is: it ignores the ids."""
    return uld(student_logits, t_lp, t_tail, temperature, real_vocab)


CROSS_LOSSES = {"uld": _uld_by_ids, "gold": gold}
"""``loss.cross_tokenizer``: each takes (student_logits, t_ids, t_lp, t_tail, id_map, temperature, real_vocab)."""
