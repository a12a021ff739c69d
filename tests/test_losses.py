"""Sparse KD losses against dense references: values, gradients, limits and the sampling estimator."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.cache.reduce import sample_targets, topk_targets
from pipeline.train.losses import cross_entropy, dense_kd, kd_loss

torch.manual_seed(0)


def full_targets(teacher_logits, temperature=1.0):
    """k = V: every id stored, empty tail."""
    return topk_targets(teacher_logits, teacher_logits.shape[-1], temperature)


def dense_log(logits, temperature=1.0):
    return torch.log_softmax(logits / temperature, -1)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_support_forward_kl_equals_dense_kl_div(temperature):
    teacher, student = torch.randn(20, 50) * 2, torch.randn(20, 50, requires_grad=True)
    ids, lp, tail = full_targets(teacher, temperature)
    labels = torch.randint(0, 50, (20,))
    sparse = kd_loss(student, ids, lp, tail, labels, temperature=temperature, cache_temperature=temperature)
    dense = F.kl_div(dense_log(student, temperature), dense_log(teacher, temperature), log_target=True,
                     reduction="none").sum(-1) * temperature**2
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    (g_sparse,) = torch.autograd.grad(sparse.sum(), student)
    (g_dense,) = torch.autograd.grad(dense.sum(), student)
    torch.testing.assert_close(g_sparse, g_dense, atol=1e-5, rtol=1e-5)


def test_topk_bucket_matches_dense_kl_of_collapsed_distributions():
    teacher, student = torch.randn(8, 30), torch.randn(8, 30)
    ids, lp, tail = topk_targets(teacher, 5, 1.0)
    got = kd_loss(student, ids, lp, tail, torch.zeros(8, dtype=torch.long))
    p, q = dense_log(teacher).exp(), dense_log(student).exp()
    head_p, head_q = p.gather(-1, ids), q.gather(-1, ids)
    want = (head_p * (head_p.log() - head_q.log())).sum(-1)
    tp, tq = 1 - head_p.sum(-1), 1 - head_q.sum(-1)
    want = want + tp * (tp.log() - tq.log())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_jsd_limits_and_interior_match_dense():
    teacher, student = torch.randn(10, 40), torch.randn(10, 40)
    ids, lp, tail = full_targets(teacher)
    labels = torch.zeros(10, dtype=torch.long)
    p, q = dense_log(teacher), dense_log(student)
    fkl = (p.exp() * (p - q)).sum(-1)
    rkl = (q.exp() * (q - p)).sum(-1)
    torch.testing.assert_close(kd_loss(student, ids, lp, tail, labels, kind="jsd", beta=0.0), fkl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kd_loss(student, ids, lp, tail, labels, kind="jsd", beta=1.0), rkl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kd_loss(student, ids, lp, tail, labels, kind="reverse_kl"), rkl, atol=1e-5, rtol=1e-5)
    beta = 0.3
    m = torch.logaddexp(p + torch.tensor(beta).log(), q + torch.tensor(1 - beta).log())
    want = beta * (p.exp() * (p - m)).sum(-1) + (1 - beta) * (q.exp() * (q - m)).sum(-1)
    torch.testing.assert_close(kd_loss(student, ids, lp, tail, labels, kind="jsd", beta=beta), want, atol=1e-5, rtol=1e-5)


def test_temperature_squared_keeps_gradient_scale():
    """At high T, the T^2-scaled gradient tends to (z_s - z_t - mean) / V (Hinton et al. 2015)."""
    teacher, student = torch.randn(4, 64), torch.randn(4, 64, requires_grad=True)
    temperature = 200.0
    ids, lp, tail = full_targets(teacher, temperature)
    loss = kd_loss(student, ids, lp, tail, torch.zeros(4, dtype=torch.long), temperature=temperature,
                   cache_temperature=temperature)
    (grad,) = torch.autograd.grad(loss.sum(), student)
    diff = student.detach() - teacher
    want = (diff - diff.mean(-1, keepdim=True)) / 64
    torch.testing.assert_close(grad * temperature, want * temperature, atol=1e-2, rtol=2e-2)
    assert grad.abs().mean() > 1e-3  # without T^2 it would be ~T^2 times smaller


def test_retempering_matches_a_cache_at_the_new_temperature():
    teacher, student = torch.randn(6, 20), torch.randn(6, 20)
    labels = torch.zeros(6, dtype=torch.long)
    at_one = full_targets(teacher, 1.0)
    at_two = full_targets(teacher, 2.0)
    retempered = kd_loss(student, *at_one, labels, temperature=2.0, cache_temperature=1.0)
    direct = kd_loss(student, *at_two, labels, temperature=2.0, cache_temperature=2.0)
    torch.testing.assert_close(retempered, direct, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("tail", ["bucket", "ground_truth", "renormalize"])
def test_all_masked_gives_zero_without_nan(kind, tail):
    teacher, student = torch.randn(5, 30), torch.randn(5, 30, requires_grad=True)
    ids, lp, tail_lp = topk_targets(teacher, 4, 1.0)
    per_token = kd_loss(student, ids, lp, tail_lp, torch.full((5,), -100), kind=kind, tail=tail)
    mask = torch.zeros(5, dtype=torch.bool)
    loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(student.grad).all()


def test_ground_truth_tail_moves_mass_to_label():
    teacher = torch.tensor([[4.0, 3.0, 0.0, 0.0, 0.0]])
    ids, lp, tail = topk_targets(teacher, 2, 1.0)
    student = torch.zeros(1, 5)
    q = torch.full((5,), 0.2)
    p = torch.softmax(teacher[0], -1)
    label_out = torch.tensor([3])  # label outside the top-2: gets all the tail mass
    want = torch.tensor([p[0], p[1], 1 - p[0] - p[1]])
    expect = (want * (want.log() - q[[0, 1, 3]].log())).sum()
    torch.testing.assert_close(kd_loss(student, ids, lp, tail, label_out, tail="ground_truth")[0], expect)
    label_in = torch.tensor([1])  # label inside: merged with its stored entry
    want = torch.tensor([p[0], 1 - p[0]])
    expect = (want * (want.log() - q[[0, 1]].log())).sum()
    torch.testing.assert_close(kd_loss(student, ids, lp, tail, label_in, tail="ground_truth")[0], expect)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("tail", ["bucket", "ground_truth", "renormalize"])
def test_unused_slots_and_a_stored_label_give_finite_loss_and_gradients(kind, tail):
    """Sample caches leave slots unused (-1) and the label is usually stored: no inf, no NaN gradient."""
    teacher, student = torch.randn(4, 9), torch.randn(4, 9, requires_grad=True)
    ids, lp, tail_lp = topk_targets(teacher, 3, 1.0)
    ids[0, 2], lp[0, 2] = -1, float("-inf")
    loss = kd_loss(student, ids, lp, tail_lp, ids[:, 0].clone(), kind=kind, tail=tail)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(student.grad).all()


def test_reverse_kl_ground_truth_with_the_label_stored_compares_on_the_stored_ids():
    """The teacher's tail moves onto a stored label, so it puts no mass outside the stored ids: the student is
    renormalised over them (as the bucket treatment does for an empty tail) instead of an infinite KL."""
    teacher, student = torch.tensor([[4.0, 3.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    ids, lp, tail = topk_targets(teacher, 2, 1.0)
    p = torch.softmax(teacher[0], -1)
    want_p = torch.stack([p[0], 1 - p[0]])
    q = torch.softmax(student[0, [0, 1]], -1)
    expect = (q * (q.log() - want_p.log())).sum()
    got = kd_loss(student, ids, lp, tail, torch.tensor([1]), kind="reverse_kl", tail="ground_truth")[0]
    torch.testing.assert_close(got, expect)


def test_renormalize_drops_the_tail():
    teacher, student = torch.randn(3, 10), torch.randn(3, 10)
    ids, lp, tail = topk_targets(teacher, 3, 1.0)
    p = torch.log_softmax(teacher.gather(-1, ids), -1)
    q = torch.log_softmax(student.gather(-1, ids), -1)
    want = (p.exp() * (p - q)).sum(-1)
    got = kd_loss(student, ids, lp, tail, torch.zeros(3, dtype=torch.long), tail="renormalize")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_ids_beyond_real_vocab_are_ignored():
    teacher, student = torch.randn(4, 12), torch.randn(4, 12, requires_grad=True)
    ids, lp, tail = topk_targets(teacher, 12, 1.0)
    loss = kd_loss(student, ids, lp, tail, torch.zeros(4, dtype=torch.long), real_vocab=10)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(student.grad).all()
    assert torch.all(student.grad[:, 10:] == 0)  # padded rows get no gradient from the stored ids


def test_sample_estimator_gradient_is_unbiased():
    """Averaged over many sampled caches, the sparse loss gradient equals the full forward-KL gradient."""
    teacher, student = torch.randn(1, 30) * 1.5, torch.randn(1, 30)
    draws, repeats = 16, 3000
    ids, lp, tail = sample_targets(teacher.expand(repeats, -1), torch.rand(repeats, draws), 1.0, draws)
    s = student.expand(repeats, -1).clone().requires_grad_(True)
    loss = kd_loss(s, ids, lp, tail, torch.zeros(repeats, dtype=torch.long))
    (grad,) = torch.autograd.grad(loss.sum(), s)
    s_full = student.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(dense_kd(s_full, teacher).sum(), s_full)
    mean, stderr = grad.mean(0), grad.std(0) / repeats**0.5
    assert torch.all((mean - want[0]).abs() <= 5 * stderr + 1e-6)


def test_cross_entropy_ignores_missing_labels():
    logits = torch.randn(4, 9)
    labels = torch.tensor([1, -100, 3, 8])
    got = cross_entropy(logits, labels)
    want = F.cross_entropy(logits, labels, reduction="none", ignore_index=-100)
    torch.testing.assert_close(got, want)
