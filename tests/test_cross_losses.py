"""Cross-tokenizer losses (ULD, GOLD) on sparse targets against dense references: values, gradients, edge rows."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.train.cross_losses import gold, uld

torch.manual_seed(0)
ATOL, RTOL = 1e-5, 1e-4  # the losses compute in fp32; the references in float64


def dense_sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(N,) sum |sort(p) - sort(q)|, both descending and zero-padded to one length: ULD over whole vocabularies."""
    width = max(p.shape[-1], q.shape[-1])
    p = torch.nn.functional.pad(p, (0, width - p.shape[-1])).sort(-1, descending=True).values
    q = torch.nn.functional.pad(q, (0, width - q.shape[-1])).sort(-1, descending=True).values
    return (p - q).abs().sum(-1)


def stored_all(teacher_logits: torch.Tensor):
    """Every teacher id stored, in a shuffled slot order (slots are not sorted), with an empty tail."""
    n, vocab = teacher_logits.shape
    ids = torch.stack([torch.randperm(vocab) for _ in range(n)])
    lp = torch.log_softmax(teacher_logits, -1).gather(-1, ids)
    return ids, lp, torch.full((n,), -math.inf, dtype=lp.dtype)


def assert_values_and_grads(got_fn, want_fn, student):
    got, want = got_fn(student), want_fn(student)
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=RTOL)
    (g_got,) = torch.autograd.grad(got.sum(), student)
    (g_want,) = torch.autograd.grad(want.sum(), student)
    torch.testing.assert_close(g_got, g_want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("v_t,v_s", [(7, 5), (5, 7)])
def test_uld_with_every_teacher_id_stored_is_the_dense_sorted_l1(v_t, v_s):
    teacher = torch.randn(4, v_t, dtype=torch.float64) * 2
    student = torch.randn(4, v_s, dtype=torch.float64, requires_grad=True)
    _, lp, tail = stored_all(teacher)
    assert_values_and_grads(lambda s: uld(s, lp, tail),
                            lambda s: dense_sorted_l1(teacher.softmax(-1), s.softmax(-1)), student)


def test_uld_top3_with_tail_by_hand():
    # Row 0: stored 0.1, 0.5, 0.2 (unsorted) + tail 0.2 against student 0.4, 0.3, 0.15 | 0.1, 0.05:
    #   |0.5-0.4| + |0.2-0.3| + |0.1-0.15| + |0.2-0.15| = 0.3.
    # Row 1: stored 0.6, 0.3, 0.1, no tail, against 0.7, 0.3 | 0, 0, 0 (two student ids, padding only):
    #   |0.6-0.7| + |0.3-0.3| + |0.1-0| + |0-0| = 0.2.
    t_lp = torch.tensor([[0.1, 0.5, 0.2], [0.6, 0.3, 0.1]]).log()
    t_tail = torch.tensor([0.2, 0.0]).log()
    s0 = torch.tensor([0.1, 0.3, 0.05, 0.4, 0.15]).log()[None]
    s1 = torch.tensor([0.3, 0.7]).log()[None]
    torch.testing.assert_close(uld(s0, t_lp[:1], t_tail[:1]), torch.tensor([0.3]))
    torch.testing.assert_close(uld(s1, t_lp[1:], t_tail[1:]), torch.tensor([0.2]))


def test_uld_top3_with_tail_is_a_lower_bound_of_the_full_distance():
    teacher, student = torch.randn(64, 7) * 2, torch.randn(64, 5) * 2
    p = teacher.softmax(-1)
    top = p.topk(3, -1).values
    got = uld(student, top.log(), torch.log1p(-top.sum(-1)))
    assert (got <= dense_sorted_l1(p, student.softmax(-1)) + 1e-6).all()
    assert (got > 0).all()


ID_MAP = torch.tensor([2, -1, -1, 0, -1, 4, -1])  # teacher 0, 3, 5 spell student 2, 0, 4; the rest are unmatched


def dense_gold(teacher_logits: torch.Tensor, student_logits: torch.Tensor, id_map: torch.Tensor) -> torch.Tensor:
    """KL over the matched ids plus the sorted L1 of everything else, over both whole vocabularies."""
    t_lp, s_lp = torch.log_softmax(teacher_logits, -1), torch.log_softmax(student_logits, -1)
    t_m = (id_map >= 0).nonzero()[:, 0]
    s_m = id_map[t_m]
    kl = (t_lp[:, t_m].exp() * (t_lp[:, t_m] - s_lp[:, s_m])).sum(-1)
    t_rest = torch.ones(t_lp.shape[-1], dtype=torch.bool).index_fill(0, t_m, False)
    s_rest = torch.ones(s_lp.shape[-1], dtype=torch.bool).index_fill(0, s_m, False)
    return kl + dense_sorted_l1(t_lp[:, t_rest].exp(), s_lp[:, s_rest].exp())


def test_gold_with_every_teacher_id_stored_is_the_dense_hybrid():
    teacher = torch.randn(4, 7, dtype=torch.float64) * 2
    student = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    ids, lp, tail = stored_all(teacher)
    assert_values_and_grads(lambda s: gold(s, ids, lp, tail, ID_MAP),
                            lambda s: dense_gold(teacher, s, ID_MAP), student)


def test_gold_without_matches_is_uld_and_with_all_matched_is_forward_kl():
    teacher, student = torch.randn(6, 7) * 2, torch.randn(6, 5)
    p = teacher.softmax(-1)
    top, ids = p.topk(3, -1)
    tail = torch.log1p(-top.sum(-1))
    none = torch.full((7,), -1)
    torch.testing.assert_close(gold(student, ids, top.log(), tail, none), uld(student, top.log(), tail))

    teacher, student = torch.randn(6, 5) * 2, torch.randn(6, 5)
    ids, lp, tail = stored_all(teacher)
    shuffle = torch.randperm(5)  # any injective map: the student's ids are renamed to match
    got = gold(student[:, shuffle], ids, lp, tail, torch.argsort(shuffle))
    t, s = torch.log_softmax(teacher, -1), torch.log_softmax(student, -1)
    torch.testing.assert_close(got, (t.exp() * (t - s)).sum(-1), atol=ATOL, rtol=RTOL)


def test_padding_rows_are_ignored_and_a_map_onto_them_is_unmatched():
    teacher, student = torch.randn(4, 7), torch.randn(4, 5)
    ids, lp, tail = stored_all(teacher)
    padded = torch.cat([student, torch.full((4, 3), 30.0)], -1)
    torch.testing.assert_close(uld(padded, lp, tail, real_vocab=5), uld(student, lp, tail))
    torch.testing.assert_close(gold(padded, ids, lp, tail, ID_MAP, real_vocab=5), gold(student, ids, lp, tail, ID_MAP))
    onto_padding = ID_MAP.clone()
    onto_padding[1] = 6
    torch.testing.assert_close(gold(padded, ids, lp, tail, onto_padding, real_vocab=5),
                               gold(student, ids, lp, tail, ID_MAP))


def test_temperature_scales_by_t_squared():
    teacher, student = torch.randn(4, 7), torch.randn(4, 5) * 3
    p = teacher.softmax(-1)
    top, ids = p.topk(3, -1)
    lp, tail = top.log(), torch.log1p(-top.sum(-1))
    torch.testing.assert_close(uld(student, lp, tail, temperature=2.0), 4 * uld(student / 2, lp, tail))
    torch.testing.assert_close(gold(student, ids, lp, tail, ID_MAP, temperature=2.0),
                               4 * gold(student / 2, ids, lp, tail, ID_MAP))
    assert not torch.allclose(uld(student, lp, tail, temperature=2.0), uld(student, lp, tail))


def test_an_empty_row_is_finite_and_no_rows_give_an_empty_tensor():
    teacher = torch.randn(3, 7)
    student = torch.randn(3, 5, requires_grad=True)
    ids, lp, tail = stored_all(teacher)
    ids[1], lp[1], tail[1] = -1, -math.inf, -math.inf
    for loss in (uld(student, lp, tail), gold(student, ids, lp, tail, ID_MAP)):
        assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
        torch.testing.assert_close(loss[1], torch.tensor(1.0))  # all the student's mass against none
        (grad,) = torch.autograd.grad(loss.sum(), student)
        assert torch.isfinite(grad).all()
    empty = torch.zeros(0, 5, requires_grad=True)
    none_ids, none_lp, none_tail = ids[:0], lp[:0], tail[:0]
    for loss in (uld(empty, none_lp, none_tail), gold(empty, none_ids, none_lp, none_tail, ID_MAP)):
        assert loss.shape == (0,)
        (grad,) = torch.autograd.grad(loss.sum(), empty)
        assert grad.shape == (0, 5)
