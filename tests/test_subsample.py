"""``cache.draws_per_epoch``: a fresh, unbiased subset of the stored draws every epoch, resumable bitwise."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import cache, cache_args, train, train_args, train_interrupted_at
from safetensors.torch import load_file

from pipeline import cli
from storage.manifest import read_manifest
from storage.read.reader import ShardLoader, SoftTargetStream
from storage.read.stream import StreamOrder
from storage.read.subsample import FreshDraws, subset_counts
from storage.remote.store import open_cache


def stored_counts(rng, rows=64, width=12, samples=40):
    """(rows, width) counts summing to ``samples`` per row, some slots unused, plus one row without draws."""
    counts = np.zeros((rows, width), dtype=np.int64)
    for row in counts[:-1]:
        used = rng.integers(1, width + 1)
        row[:used] = rng.multinomial(samples, rng.dirichlet(np.ones(used)))
    return counts


def test_subset_sums_to_n_uses_stored_draws_and_is_unbiased():
    rng = np.random.default_rng(0)
    counts = stored_counts(rng)
    total = np.zeros(counts.shape)
    epochs = 3000
    for epoch in range(epochs):
        picked = subset_counts(counts, 10, np.random.default_rng([7, epoch]))
        assert (picked <= counts).all() and (picked >= 0).all()  # only stored draws, each at most once
        assert (picked.sum(-1)[:-1] == 10).all() and (picked[-1] == 0).all()
        total += picked
    # Hypergeometric: E[picked] = n * count / N; the standard error of the mean is below 0.01 here.
    np.testing.assert_allclose(total / epochs / 10, counts / 40, atol=0.02)


def test_fresh_draws_are_a_function_of_seed_epoch_and_sample():
    counts = stored_counts(np.random.default_rng(1))
    fresh = FreshDraws(draws=8, samples=40, head_width=0, seed=3)
    a = fresh.counts(counts, epoch=0, index=5)
    assert np.array_equal(a, fresh.counts(counts, epoch=0, index=5))
    assert not np.array_equal(a, fresh.counts(counts, epoch=1, index=5))
    assert not np.array_equal(a, fresh.counts(counts, epoch=0, index=6))
    assert not np.array_equal(a, FreshDraws(8, 40, 0, seed=4).counts(counts, epoch=0, index=5))


@pytest.fixture(scope="module")
def sample_cache(tmp_path_factory, llama_dir, corpus_jsonl):
    args = cache_args(llama_dir, corpus_jsonl, tmp_path_factory.mktemp("sub") / "c",
                      **{"data.seq_len": 32, "cache.mode": "sample", "cache.samples": 16})
    return cache(args).directory


@pytest.fixture(scope="module")
def hybrid_cache(tmp_path_factory, llama_dir, corpus_jsonl):
    args = cache_args(llama_dir, corpus_jsonl, tmp_path_factory.mktemp("hyb") / "c",
                      **{"data.seq_len": 32, "cache.mode": "hybrid", "cache.top_k": 4, "cache.samples": 12})
    return cache(args).directory


def first_batches(directory, draws, steps):
    stream = SoftTargetStream(directory, StreamOrder(batch_size=4, seed=0), draws_per_epoch=draws)
    iterator = iter(stream)
    return [next(iterator) for _ in range(steps)], stream.steps_per_epoch


@pytest.mark.parametrize("mode", ["sample", "hybrid"])
def test_stream_serves_a_subset_of_the_stored_draws(mode, sample_cache, hybrid_cache):
    directory = sample_cache if mode == "sample" else hybrid_cache
    manifest = read_manifest(directory)
    head = manifest.top_k if mode == "hybrid" else 0
    loader = ShardLoader(open_cache(directory), "train")
    stored = np.concatenate([loader(i)["topk_ids"] for i in range(len(loader.records))])
    plain, per_epoch = first_batches(directory, None, 1)
    fresh, _ = first_batches(directory, 5, per_epoch + 1)
    batch = fresh[0]
    assert set(batch) == set(plain[0])
    assert torch.equal(batch["input_ids"], plain[0]["input_ids"])
    ids, logprobs = batch["topk_ids"], batch["topk_logprobs"]
    assert torch.equal(ids[..., :head], plain[0]["topk_ids"][..., :head])  # the exact head is kept as it is
    for row, index in enumerate(batch["sample_index"].tolist()):
        used = ids[row, ..., head:] >= 0
        kept = set(ids[row, ..., head:][used].tolist())
        assert kept <= set(stored[index, ..., head:][stored[index, ..., head:] >= 0].tolist())
    weights = torch.exp(logprobs[..., head:])
    expected = torch.exp(plain[0]["topk_logprobs"][..., head:]).sum(-1)  # 1, or a hybrid's tail mass
    assert torch.allclose(weights.sum(-1), expected, atol=2e-3)
    counts = weights / expected.clamp(min=1e-6)[..., None] * 5  # the subset's counts: 5 draws in all
    assert torch.allclose(counts, counts.round(), atol=0.02)
    assert torch.equal(counts.round().sum(-1), torch.where(expected > 0, 5.0, 0.0))
    # The same sequence in the next epoch gets other draws (almost surely, over a whole batch).
    again = [b for b in fresh[per_epoch:] for i in b["sample_index"].tolist() if i == int(batch["sample_index"][0])]
    if again:
        assert not torch.equal(again[0]["topk_logprobs"], batch["topk_logprobs"])


def test_resume_with_fresh_draws_is_bitwise(tmp_path, sample_cache, monkeypatch):
    settings = {"cache.draws_per_epoch": 6, "train.steps": 12}
    whole = train(train_args(sample_cache, tmp_path / "whole", **settings))
    train_interrupted_at(7, train_args(sample_cache, tmp_path / "resumed", **settings), monkeypatch)
    resumed = train(train_args(sample_cache, tmp_path / "resumed", **settings))
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plain = train(train_args(sample_cache, tmp_path / "plain", **{"train.steps": 12}))
    c = load_file(plain / "model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the option changes what is trained on


@pytest.mark.parametrize("draws", [16, 20])
def test_draws_per_epoch_must_be_below_the_stored_draws(draws, tmp_path, sample_cache, capsys):
    argv = ["train", *train_args(sample_cache, tmp_path / "o", **{"cache.draws_per_epoch": draws})]
    assert cli.main(["-q", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"cache.draws_per_epoch={draws} must be below the 16 draws per position" in err
    assert not (tmp_path / "o" / "final").exists()
