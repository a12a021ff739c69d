"""A fresh subset of each position's stored draws every epoch (``cache.draws_per_epoch``).

A sample cache stores, per position, N draws from the teacher as counts of the distinct ids drawn (a hybrid
cache: N draws from the mass outside its exact head). Reusing one cache for several epochs shows the student
the *same* draws again, where online KD would see the exact distribution every time. Choosing n of the N
stored draws uniformly without replacement gives the counts of a multivariate hypergeometric draw, whose mean
is ``n * count / N``: every epoch then sees an unbiased n-draw sample, and different epochs see different ones.

The choice is a pure function of (seed, epoch, global sample index), like the sample order itself
(``storage.read.stream``), so a resumed job sees the same subsets whatever its number of ranks and workers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from storage.codec.logprobs import count_logprobs

STREAM_TAG = 0x5D3A  # keeps these generators apart from the shuffles of ``storage.read.stream`` (same seed, epoch)


def subset_counts(counts: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """(T, S) counts of N draws per row -> (T, S) counts of ``n`` of those draws, chosen without replacement.

    Draw ``d`` of a row (0 <= d < the row's total) belongs to the slot whose cumulative count first exceeds
    it; the ``n`` draws with the smallest uniform keys are chosen. A row without draws (total 0) stays empty.
    """
    rows = counts.shape[0]
    ends = np.cumsum(counts, axis=-1, dtype=np.int32)
    totals = ends[:, -1:]
    width = max(int(totals.max(initial=0)), n)
    keys = rng.random((rows, width))
    keys[np.arange(width)[None, :] >= totals] = np.inf  # draws a row does not have are never chosen
    threshold = np.partition(keys, n - 1, axis=-1)[:, n - 1 : n]  # (float64 keys: ties have probability ~0)
    chosen_before = np.zeros((rows, width + 1), dtype=np.int32)  # [:, d]: chosen among draws 0..d-1
    np.cumsum(keys <= threshold, axis=-1, out=chosen_before[:, 1:])
    flat, base = chosen_before.ravel(), np.arange(rows, dtype=np.int32)[:, None] * (width + 1)
    picked = flat[base + ends] - flat[base + ends - counts]
    return np.where(totals > 0, picked, 0)


@dataclass(frozen=True)
class FreshDraws:
    """Replace a batch's sampled slots by a fresh ``draws`` -of- ``samples`` subset per epoch.

    Batches come from a reader that decoded with ``counts=True``: they carry ``sample_counts`` (B, T, S) and,
    for a hybrid cache, ``sample_base`` (B, T) (the log of the mass outside the head), which are consumed.
    """

    draws: int
    samples: int
    head_width: int
    seed: int = 0

    def counts(self, counts: np.ndarray, epoch: int, index: int) -> np.ndarray:
        """The subset of one sequence's (T, S) counts in ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch, index, STREAM_TAG])
        return subset_counts(counts, self.draws, rng)

    def __call__(self, batch: dict[str, np.ndarray], epoch: int) -> dict[str, np.ndarray]:
        stored = batch.pop("sample_counts")
        base = batch.pop("sample_base", None)
        picked = np.stack([self.counts(c, epoch, int(i)) for c, i in zip(stored, batch["sample_index"], strict=True)])
        head = self.head_width
        ids = np.where(picked > 0, batch["topk_ids"][..., head:], -1).astype(np.int32)
        logprobs = count_logprobs(picked, self.draws, base).astype(np.float32)
        # The stored ids ascend with unused slots last (``storage.codec.targets``): a stable partition keeps that.
        order = np.argsort(ids < 0, axis=-1, kind="stable")
        order += np.arange(0, order.size, order.shape[-1]).reshape(*order.shape[:-1], 1)
        ids, logprobs = (a.ravel()[order] for a in (ids, logprobs))
        return {**batch, "topk_ids": np.concatenate([batch["topk_ids"][..., :head], ids], axis=-1),
                "topk_logprobs": np.concatenate([batch["topk_logprobs"][..., :head], logprobs], axis=-1)}
