"""Torch-facing readers of a finished cache: a shuffled training stream and a sequential pass.

Batches are dicts of tensors:
``input_ids`` (B, T) int64, ``topk_ids`` (B, T, W) int64 (-1 in unused slots),
``topk_logprobs`` (B, T, W) float32, ``tail_logprob`` (B, T) float32 and
``loss_mask`` (B, T) bool.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from storage.formats import get_format
from storage.manifest import Manifest, read_manifest
from storage.stream import ShardRows, StreamState, iterate_batches

BATCH_DTYPES = {"input_ids": np.int64, "topk_ids": np.int64, "topk_logprobs": np.float32,
                "tail_logprob": np.float32, "loss_mask": np.bool_}


def to_tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Convert with one copy each, so tensors never alias read-only (memory-mapped) shard buffers."""
    return {name: torch.from_numpy(a.astype(BATCH_DTYPES[name], copy=True)) for name, a in arrays.items()}


class ShardLoader:
    """Reads a split's shards by index, verifying each checksum the first time it is opened."""

    def __init__(self, manifest: Manifest, split: str, verify: bool = True):
        self.manifest, self.verify = manifest, verify
        self.records = manifest.shards_for(split)
        self.format = get_format(manifest.data["format"])
        self._verified: set[int] = set()

    @property
    def sizes(self) -> list[int]:
        return [r["sequences"] for r in self.records]

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        record = self.records[index]
        if self.verify and index not in self._verified:
            path = self.manifest.check_shard(record)
            self._verified.add(index)
        else:
            path = self.manifest.shard_path(record)
        return self.format.read(path)


class SoftTargetStream(IterableDataset):
    """An endless, deterministic, resumable stream of training batches from one split of a cache.

    ``rank``/``world_size`` default to torchrun's ``RANK``/``WORLD_SIZE``. Use
    it with ``DataLoader(stream, batch_size=None, num_workers=N)``; the order
    does not depend on N.
    """

    def __init__(self, directory: str | Path, batch_size: int, split: str = "train", seed: int = 0,
                 shuffle_buffer: int = 1024, start: StreamState | None = None, verify: bool = True,
                 rank: int | None = None, world_size: int | None = None, max_open_shards: int = 4,
                 prefetch_depth: int = 4):
        self.manifest = read_manifest(directory)
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.shuffle_buffer, self.start, self.verify = shuffle_buffer, start or StreamState(), verify
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        self.world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        self.max_open_shards, self.prefetch_depth = max_open_shards, prefetch_depth
        self.sizes = ShardLoader(self.manifest, split, verify=False).sizes
        if not self.sizes:
            raise ValueError(f"cache {directory} has no {split!r} shards")
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"batch size {batch_size} x {self.world_size} ranks exceeds the {sum(self.sizes)} {split} sequences "
                f"of {directory}; lower train.batch_size"
            )

    @property
    def batches_per_epoch(self) -> int:
        return sum(self.sizes) // self.world_size // self.batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rows = ShardRows(ShardLoader(self.manifest, self.split, self.verify), self.sizes, self.max_open_shards)
        batches = iterate_batches(rows, self.sizes, self.batch_size, self.seed, self.shuffle_buffer, self.rank,
                                  self.world_size, self.start, worker, workers, depth=self.prefetch_depth)
        for batch in batches:
            yield to_tensors(batch)


def sequential_batches(directory: str | Path, split: str, batch_size: int,
                       verify: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Every sequence of ``split`` once, in manifest order (for evaluation)."""
    loader = ShardLoader(read_manifest(directory), split, verify)
    for index in range(len(loader.records)):
        shard = loader(index)
        n = len(shard["input_ids"])
        for lo in range(0, n, batch_size):
            yield to_tensors({k: v[lo : lo + batch_size] for k, v in shard.items()})
