"""Streaming batches of cached soft targets: pure ordering and splitting functions plus a reader.

The sample order of an epoch is a pure function of (seed, epoch, shard sizes):
shards are shuffled, then samples are shuffled inside consecutive blocks of
``shuffle_buffer`` samples, so a reader only needs the few shards a block
touches. Training consumes that order in *global batches* of
B x W x A samples (micro-batch, world size, accumulation): global batch g is
positions [g*BWA, (g+1)*BWA) of the order, rank r takes the r-th run of B*A of
them, and micro-batch m is the m-th run of B within that. The samples of one
optimizer step therefore do not depend on W or A, only on their product, and
a job may resume on another number of ranks. The ``n mod BWA`` samples at the
end of an epoch's order are left out of it. Micro-batches are dealt
round-robin to DataLoader workers in the order the DataLoader collects them,
so the stream a rank sees does not depend on the number of workers.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from storage.read.prefetch import prefetch


@dataclass(frozen=True)
class StreamState:
    """Where a job's stream stands: ``samples`` global samples (whole global batches) are consumed."""

    samples: int = 0


@dataclass(frozen=True)
class StreamOrder:
    """What fixes the batches a rank sees: micro-batch size, seed, shuffle block, and its place in the job."""

    batch_size: int
    seed: int = 0
    shuffle_buffer: int = 1024
    rank: int = 0
    world_size: int = 1
    grad_accum: int = 1

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over every rank and micro-batch."""
        return self.batch_size * self.world_size * self.grad_accum

    def steps_per_epoch(self, samples: int) -> int:
        return samples // self.global_batch


def shard_permutation(shards: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which an epoch visits the shards (its shuffle blocks run through them in this order)."""
    return np.random.default_rng([seed, epoch]).permutation(shards)


def shard_schedule(shards: int, seed: int, first_epoch: int) -> Iterator[int]:
    """Shard indices in the order the epochs from ``first_epoch`` on first need them, endlessly: what a reader
    of a remote cache downloads ahead."""
    for epoch in itertools.count(first_epoch):
        yield from shard_permutation(shards, seed, epoch).tolist()


def epoch_order(shard_sizes: list[int], seed: int, epoch: int, shuffle_buffer: int) -> np.ndarray:
    """Global sample indices (into the shards concatenated in manifest order) for one epoch."""
    offsets = np.concatenate([[0], np.cumsum(shard_sizes)]).astype(np.int64)
    shards = shard_permutation(len(shard_sizes), seed, epoch)
    order = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in shards]) if len(shards) else np.empty(0, np.int64)
    for start in range(0, len(order), shuffle_buffer):
        block = order[start : start + shuffle_buffer]
        order[start : start + shuffle_buffer] = np.random.default_rng([seed, epoch, start]).permutation(block)
    return order


def micro_batch_samples(epoch_samples: np.ndarray, micro: int, order: StreamOrder) -> np.ndarray:
    """The samples of this rank's ``micro``-th micro-batch of an epoch (counting over its global batches)."""
    if not 0 <= order.rank < order.world_size:
        raise ValueError(f"rank {order.rank} is outside [0, {order.world_size})")
    step, m = divmod(micro, order.grad_accum)
    first = step * order.global_batch + (order.rank * order.grad_accum + m) * order.batch_size
    return epoch_samples[first : first + order.batch_size]


class ShardRows:
    """Decoded shards kept in a small LRU, so memory is bounded whatever the cache size."""

    def __init__(self, load: Callable[[int], dict[str, np.ndarray]], shard_sizes: list[int], max_open: int = 4):
        self._load, self._max_open = load, max_open
        self._offsets = np.concatenate([[0], np.cumsum(shard_sizes)]).astype(np.int64)
        self._open: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    def _shard(self, index: int) -> dict[str, np.ndarray]:
        if index in self._open:
            self._open.move_to_end(index)
        else:
            self._open[index] = self._load(index)
            while len(self._open) > self._max_open:
                self._open.popitem(last=False)
        return self._open[index]

    def gather(self, samples: np.ndarray) -> dict[str, np.ndarray]:
        """Stack the rows of global ``samples`` into arrays with a leading batch axis."""
        shard_ids = np.searchsorted(self._offsets, samples, side="right") - 1
        out: dict[str, np.ndarray] = {}
        # One fancy-indexing copy per shard touched, in order of first use, instead of one per sample.
        for shard_id in dict.fromkeys(shard_ids.tolist()):
            where = np.flatnonzero(shard_ids == shard_id)
            shard = self._shard(shard_id)
            rows = samples[where] - self._offsets[shard_id]
            for name, array in shard.items():
                if name not in out:
                    out[name] = np.empty((len(samples), *array.shape[1:]), dtype=array.dtype)
                out[name][where] = array[rows]
        return out


def iterate_batches(rows: ShardRows, shard_sizes: list[int], order: StreamOrder, start: StreamState, *,
                    worker: int = 0, num_workers: int = 1, depth: int = 4,
                    transform: Callable[[dict[str, np.ndarray], int], dict[str, np.ndarray]] | None = None,
                    ) -> Iterator[dict[str, np.ndarray]]:
    """Yield this (rank, worker)'s micro-batches from ``start`` on, endlessly, prefetched on a background thread.

    Micro-batches are numbered across epochs, so the round-robin deal to
    workers stays in step over epoch boundaries. Each batch also carries
    ``sample_index`` (B,) int64: its samples' global indices, for audit logs.
    ``transform(batch, epoch)``, if given, rewrites each batch on that thread;
    it must be a pure function of the batch and epoch (``storage.read.subsample``).
    """
    steps = order.steps_per_epoch(sum(shard_sizes))
    if steps == 0:
        raise ValueError(f"global batch {order.global_batch} exceeds the {sum(shard_sizes)} samples of an epoch")
    if start.samples % order.global_batch:
        raise ValueError(f"stream position {start.samples} is not a multiple of the global batch {order.global_batch}")
    per_epoch = steps * order.grad_accum
    first = start.samples // order.global_batch * order.grad_accum

    def produce():
        epoch, samples = -1, None
        for micro in itertools.count(first + worker, num_workers):
            if micro // per_epoch != epoch:
                epoch = micro // per_epoch
                samples = epoch_order(shard_sizes, order.seed, epoch, order.shuffle_buffer)
            picked = micro_batch_samples(samples, micro % per_epoch, order)
            batch = {**rows.gather(picked), "sample_index": picked}
            yield transform(batch, epoch) if transform else batch

    return prefetch(produce(), depth)
