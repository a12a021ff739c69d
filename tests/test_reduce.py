"""Top-k and sample reductions against dense references."""
from __future__ import annotations

import pytest
import torch

from pipeline.cache.reduce import sample_targets, sequence_uniforms, topk_targets, unique_counts


def test_topk_matches_log_softmax_and_tail():
    torch.manual_seed(0)
    logits = torch.randn(50, 300) * 3
    ids, logprobs, tail = topk_targets(logits, 10, temperature=1.5)
    dense = torch.log_softmax(logits / 1.5, dim=-1)
    want_lp, want_ids = dense.topk(10, dim=-1)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(logprobs, want_lp, atol=1e-4, rtol=1e-5)  # float32 sums of 300 exps in two orders
    rest = dense.exp().sum(-1) - want_lp.exp().sum(-1)
    torch.testing.assert_close(tail.exp(), rest, atol=1e-5, rtol=1e-4)


def test_topk_of_whole_vocab_has_empty_tail():
    _, _, tail = topk_targets(torch.randn(4, 16), 16, temperature=1.0)
    assert torch.all(torch.isneginf(tail))


def test_unique_counts():
    draws = torch.tensor([[3, 1, 3, 3, 2], [5, 5, 5, 5, 5]])
    ids, counts = unique_counts(draws)
    assert ids.tolist() == [[1, 2, 3, -1, -1], [5, -1, -1, -1, -1]]
    assert counts.tolist() == [[1, 1, 3, 0, 0], [5, 0, 0, 0, 0]] and counts.dtype == torch.int32


@pytest.mark.parametrize("sampler", ["systematic", "multinomial"])
def test_sampling_is_unbiased(sampler):
    """Averaged over many draws, the stored weights match the teacher's probabilities."""
    torch.manual_seed(0)
    logits = torch.randn(1, 40) * 2
    probs = torch.softmax(logits / 0.8, dim=-1)[0].double()
    rows, draws = 4000, 8
    uniforms = sequence_uniforms(0, 0, 0, rows, draws, sampler)
    ids, logprobs, tail = sample_targets(logits.expand(rows, -1), uniforms, 0.8, width=draws)
    weights = torch.zeros(rows, 41, dtype=torch.float64)
    weights.scatter_add_(1, ids.clamp(min=-1) + 1, logprobs.exp().double())  # column 0 collects padding
    estimate = weights[:, 1:].mean(0)
    stderr = (probs * (1 - probs) / (rows * draws)).sqrt()
    assert torch.all((estimate - probs).abs() <= 5 * stderr + 1e-12)
    assert torch.all(torch.isneginf(tail))


def test_systematic_draws_hold_each_count_within_one_of_n_p():
    """Binomial counts stray by about sqrt(N p); systematic ones by less than one draw."""
    torch.manual_seed(2)
    logits = torch.randn(300, 200) * 2
    draws = 50
    expected = torch.softmax(logits, dim=-1).double() * draws
    for sampler, worst in (("systematic", 1.0), ("multinomial", None)):
        ids, logprobs, _ = sample_targets(logits, sequence_uniforms(1, 0, 0, 300, draws, sampler), 1.0, draws)
        counts = torch.zeros(300, 201, dtype=torch.float64)
        counts.scatter_add_(1, ids + 1, (logprobs.exp() * draws).double())  # column 0 collects padding
        error = (counts[:, 1:] - expected).abs().max().item()
        if worst:
            assert error < worst + 1e-3  # counts come back through float32 log-probs
        else:
            assert error > 2.0


def test_an_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="stratified"):
        sequence_uniforms(0, 0, 0, 4, 4, "stratified")


@pytest.mark.parametrize("sampler", ["systematic", "multinomial"])
def test_sampling_does_not_depend_on_chunking(sampler):
    logits = torch.randn(12, 64)
    uniforms = sequence_uniforms(3, 0, 5, 12, 16, sampler)
    whole = sample_targets(logits, uniforms, 1.0, 16)
    parts = [sample_targets(logits[i : i + 5], uniforms[i : i + 5], 1.0, 16) for i in range(0, 12, 5)]
    for got, part in zip(whole, zip(*parts)):
        assert torch.equal(got, torch.cat(part))
    assert torch.equal(uniforms, sequence_uniforms(3, 0, 5, 12, 16, sampler))
    assert not torch.equal(uniforms, sequence_uniforms(3, 0, 6, 12, 16, sampler))
    assert uniforms.dtype == torch.float32 and 0 <= uniforms.min() and uniforms.max() < 1


def test_sample_width_bound_by_vocab_keeps_every_draw():
    logits = torch.zeros(3, 4)
    ids, logprobs, _ = sample_targets(logits, torch.rand(3, 50), 1.0, width=4)
    assert ids.shape == (3, 4)
    torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones(3))


def test_hybrid_is_exact_head_plus_unbiased_tail():
    from pipeline.cache.reduce import hybrid_targets

    torch.manual_seed(1)
    logits = torch.randn(1, 30) * 2
    probs = torch.softmax(logits, -1)[0].double()
    rows, draws = 3000, 6
    ids, logprobs, tail = hybrid_targets(logits.expand(rows, -1), 4, torch.rand(rows, draws), 1.0)
    head = probs.topk(4).indices
    assert torch.equal(ids[0, :4], head) and torch.all(torch.isneginf(tail))
    weights = torch.zeros(rows, 31, dtype=torch.float64).scatter_add_(1, ids + 1, logprobs.exp().double())[:, 1:]
    torch.testing.assert_close(weights.sum(-1), torch.ones(rows, dtype=torch.float64), atol=1e-5, rtol=0)
    estimate = weights.mean(0)
    stderr = weights.std(0) / rows**0.5
    assert torch.all((estimate - probs).abs() <= 5 * stderr + 1e-6)
