"""Torch-facing readers of a finished cache: a shuffled training stream and a sequential pass.

Batches are dicts of tensors:
``input_ids`` (B, T) int64, ``topk_ids`` (B, T, W) int64 (-1 in unused slots; the order of
``storage.codec.targets``),
``topk_logprobs`` (B, T, W) float32, ``tail_logprob`` (B, T) float32 and
``loss_mask`` (B, T) bool, and in a cache with text alignment ``token_role`` (B, T) uint8; training batches
also carry ``sample_index`` (B,) int64, the global index of each sequence in the split.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from storage.backends import get_backend
from storage.codec.layout import Layout
from storage.errors import BatchTooLargeError, CacheNotFoundError
from storage.manifest import ShardRecord
from storage.read.stream import ShardRows, StreamOrder, StreamState, iterate_batches, shard_schedule
from storage.read.subsample import FreshDraws
from storage.remote.store import PREFETCH_SHARDS, Cache, open_cache

BATCH_DTYPES = {"input_ids": np.int64, "topk_ids": np.int64, "topk_logprobs": np.float32,
                "tail_logprob": np.float32, "loss_mask": np.bool_, "sample_index": np.int64, "token_role": np.uint8}


def to_tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Convert with one copy each, so tensors never alias read-only (memory-mapped) shard buffers."""
    return {name: torch.from_numpy(a.astype(BATCH_DTYPES[name], copy=True)) for name, a in arrays.items()}


def read_shard(cache: Cache, record: ShardRecord) -> dict[str, np.ndarray]:
    """The reader arrays of one shard of ``cache``, as ``storage.codec.targets`` describes them (not verified)."""
    return Layout.of(cache.manifest).decode(get_backend(cache.manifest.format).read(cache.store.path(record)))


class ShardLoader:
    """Reads a split's shards by index, verifying each checksum the first time it is opened.

    For a remote cache, each load also starts downloading the next ``PREFETCH_SHARDS`` shards of
    ``upcoming`` (shard indices in the order the reader first needs them; default: manifest order).
    """

    def __init__(self, cache: Cache, split: str, verify: bool = True, upcoming: Iterator[int] | None = None,
                 counts: bool = False):
        self.store, self.verify, self.counts = cache.store, verify, counts
        self.records = cache.manifest.shards_for(split)
        self.backend = get_backend(cache.manifest.format)
        self.layout = Layout.of(cache.manifest)
        self._verified: set[int] = set()
        self._upcoming = iter(upcoming if upcoming is not None else range(len(self.records)))
        self._window: list[int] = []  # the next entries of ``upcoming``

    def _prefetch_after(self, index: int) -> None:
        """Move the schedule past ``index`` and start downloading the shards that follow it."""
        self._window += itertools.islice(self._upcoming, 2 * PREFETCH_SHARDS + 1 - len(self._window))
        if index in self._window:
            del self._window[: self._window.index(index) + 1]
        self.store.prefetch([self.records[i] for i in self._window[:PREFETCH_SHARDS]])

    @property
    def sizes(self) -> list[int]:
        return [r.sequences for r in self.records]

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        record = self.records[index]
        if self.verify and index not in self._verified:
            path = self.store.checked_path(record)
            self._verified.add(index)
        else:
            path = self.store.path(record)
        self._prefetch_after(index)
        return self.layout.decode(self.backend.read(path), counts=self.counts)


class SoftTargetStream(IterableDataset):
    """An endless, deterministic, resumable stream of training batches from one split of a cache.

    ``order`` fixes the batches of this rank (the caller passes its rank and
    world size). Use it with ``DataLoader(stream, batch_size=None, num_workers=N)``;
    the order does not depend on N. With ``draws_per_epoch`` (a format-3 sample
    or hybrid cache), every epoch trains on a fresh subset of that many of each
    position's stored draws (``storage.read.subsample``).
    """

    def __init__(self, cache: str | Path | Cache, order: StreamOrder, split: str = "train",
                 start: StreamState | None = None, verify: bool = True, max_open_shards: int = 4,
                 prefetch_depth: int = 4, draws_per_epoch: int | None = None):
        self.cache = cache if isinstance(cache, Cache) else open_cache(cache)
        directory = self.cache.location
        self.draws_per_epoch = draws_per_epoch
        self.order, self.split, self.start, self.verify = order, split, start or StreamState(), verify
        self.max_open_shards, self.prefetch_depth = max_open_shards, prefetch_depth
        self.sizes = ShardLoader(self.cache, split, verify=False).sizes
        if not self.sizes:
            raise CacheNotFoundError(f"cache {directory} has no {split!r} shards")
        if self.steps_per_epoch == 0:
            raise BatchTooLargeError(
                f"the global batch of {order.global_batch} (batch size {order.batch_size} x {order.world_size} ranks "
                f"x {order.grad_accum} accumulation) exceeds the {sum(self.sizes)} {split} sequences of {directory}; "
                "lower train.batch_size or train.grad_accum"
            )

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps (global batches) per pass over the split."""
        return self.order.steps_per_epoch(sum(self.sizes))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        first_epoch = self.start.samples // self.order.global_batch // max(self.steps_per_epoch, 1)
        upcoming = shard_schedule(len(self.sizes), self.order.seed, first_epoch)
        loader = ShardLoader(self.cache, self.split, self.verify, upcoming, counts=bool(self.draws_per_epoch))
        rows = ShardRows(loader, self.sizes, self.max_open_shards)
        fresh = None
        if self.draws_per_epoch:
            fresh = FreshDraws(self.draws_per_epoch, loader.layout.samples, loader.layout.head_width, self.order.seed)
        batches = iterate_batches(rows, self.sizes, self.order, self.start, worker=worker, num_workers=workers,
                                  depth=self.prefetch_depth, transform=fresh)
        for batch in batches:
            yield to_tensors(batch)


def sequential_batches(cache: str | Path | Cache, split: str, batch_size: int,
                       verify: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Every sequence of ``split`` once, in manifest order (for evaluation)."""
    loader = ShardLoader(cache if isinstance(cache, Cache) else open_cache(cache), split, verify)
    for index in range(len(loader.records)):
        shard = loader(index)
        n = len(shard["input_ids"])
        for lo in range(0, n, batch_size):
            yield to_tensors({k: v[lo : lo + batch_size] for k, v in shard.items()})
