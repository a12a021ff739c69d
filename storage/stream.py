"""Streaming batches of cached soft targets: pure ordering and splitting functions plus a reader.

The sample order of an epoch is a pure function of (seed, epoch, shard sizes):
shards are shuffled, then samples are shuffled inside consecutive blocks of
``shuffle_buffer`` samples, so a reader only needs the few shards a block
touches. Each rank takes an equal share (the ``n mod world_size`` samples at
the end of the shuffled order are left out of that epoch, so DDP ranks never
disagree on the number of steps). Batches are dealt round-robin to DataLoader
workers in the order the DataLoader collects them, so the stream a rank sees
does not depend on the number of workers.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from storage.prefetch import prefetch


@dataclass(frozen=True)
class StreamState:
    """Where a rank's stream stands: the next batch to yield is ``batch`` of ``epoch``."""

    epoch: int = 0
    batch: int = 0

    def advance(self, batches: int, batches_per_epoch: int) -> StreamState:
        """The state after consuming ``batches`` more batches."""
        total = self.epoch * batches_per_epoch + self.batch + batches
        return StreamState(total // batches_per_epoch, total % batches_per_epoch)


@dataclass(frozen=True)
class StreamOrder:
    """What fixes the batches a rank sees: batch size, seed, shuffle block, and its place among the ranks."""

    batch_size: int
    seed: int = 0
    shuffle_buffer: int = 1024
    rank: int = 0
    world_size: int = 1


def epoch_order(shard_sizes: list[int], seed: int, epoch: int, shuffle_buffer: int) -> np.ndarray:
    """Global sample indices (into the shards concatenated in manifest order) for one epoch."""
    offsets = np.concatenate([[0], np.cumsum(shard_sizes)]).astype(np.int64)
    rng = np.random.default_rng([seed, epoch])
    shards = rng.permutation(len(shard_sizes))
    order = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in shards]) if len(shards) else np.empty(0, np.int64)
    for start in range(0, len(order), shuffle_buffer):
        block = order[start : start + shuffle_buffer]
        order[start : start + shuffle_buffer] = np.random.default_rng([seed, epoch, start]).permutation(block)
    return order


def rank_samples(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's samples: every ``world_size``-th of an equal-length prefix of ``order``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    usable = len(order) // world_size * world_size
    return order[:usable][rank::world_size]


def worker_batches(first: int, stop: int, worker: int, num_workers: int) -> range:
    """Batch indices in [first, stop) that DataLoader worker ``worker`` produces, in order."""
    return range(first + worker, stop, num_workers)


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
                    worker: int = 0, num_workers: int = 1, loop: bool = True,
                    depth: int = 4) -> Iterator[dict[str, np.ndarray]]:
    """Yield this (rank, worker)'s batches from ``start`` on, prefetched on a background thread."""
    size = order.batch_size

    def produce():
        epoch, first = start.epoch, start.batch
        while True:
            samples = rank_samples(epoch_order(shard_sizes, order.seed, epoch, order.shuffle_buffer), order.rank,
                                   order.world_size)
            stop = len(samples) // size
            if stop == 0:
                raise ValueError(f"batch size {size} exceeds the {len(samples)} samples a rank gets per epoch")
            for b in worker_batches(first, stop, worker, num_workers):
                yield rows.gather(samples[b * size : (b + 1) * size])
            if not loop:
                return
            epoch, first = epoch + 1, 0

    return prefetch(produce(), depth)
