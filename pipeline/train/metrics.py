"""What the training loop records: ``metrics.jsonl``, the time spent waiting for data, and an audit of the samples.

The audit is a hash chain over the global sample indices of every optimizer
step, gathered from all ranks in rank order: two runs that trained on the
same samples in the same steps have equal chains, whatever their world size
or accumulation, which is how elastic resume is checked.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from pipeline.dist import World, all_gather_rows
from storage import is_disk_full, no_space, write_text

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    """``metrics.jsonl``: one JSON record per line; on resume, records after the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
            write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            try:
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
            except OSError as exc:
                if is_disk_full(exc):
                    raise no_space(self.path) from exc
                raise


def _step_of(line: str) -> float:
    """A record's step; a line torn by a kill in the middle of its append sorts after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


class DataWait:
    """Time spent waiting for batches, apart from the first fetch (which opens, verifies and decodes a shard
    before prefetching can start: a fixed start-up cost, not a steady-state one)."""

    def __init__(self):
        self.startup: float | None = None
        self.waited = self.busy = 0.0

    def add(self, began: float, fetched: float, ended: float) -> None:
        if self.startup is None:
            self.startup = fetched - began
        else:
            self.waited, self.busy = self.waited + fetched - began, self.busy + ended - began

    @property
    def fraction(self) -> float:
        return self.waited / max(self.busy, 1e-9)


def chain_samples(previous: str, local: list[torch.Tensor], here: World) -> str:
    """Extend the hash chain ``previous`` with one step's samples: this rank's micro-batches' ``sample_index``
    (B,) int64 tensors, gathered over ranks (a collective)."""
    gathered = all_gather_rows(torch.cat(local), here)
    digest = hashlib.sha256(previous.encode())
    digest.update(gathered.reshape(-1).numpy().astype(np.int64).tobytes())
    return digest.hexdigest()
