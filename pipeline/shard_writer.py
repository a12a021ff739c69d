"""Background shard writer and the per-shard bookkeeping of a cache directory.

Encoding, compression, hashing and disk writes run on a thread, so they
overlap the teacher's next batches. Each finished shard gets a
``<shard>.done.json`` record holding its checksum; the manifest is assembled
from these records once every shard has one.
"""
from __future__ import annotations

import json
import queue
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from storage.atomic import remove_path, stale_temporaries
from storage.manifest import done_record_path, shard_bytes, shard_sha256, write_json


@dataclass(frozen=True)
class ShardPlan:
    """One shard of the cache: sequences [start, start + count) of ``split``."""

    split: str
    index: int
    start: int
    count: int
    suffix: str

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}{self.suffix}"


def plan_shards(sequences: dict[str, int], shard_size: int, suffix: str) -> list[ShardPlan]:
    """Cut every split into shards of ``shard_size`` sequences; train first, then eval."""
    plans = []
    for split in sorted(sequences, key=lambda s: (s != "train", s)):
        for index, start in enumerate(range(0, sequences[split], shard_size)):
            plans.append(ShardPlan(split, index, start, min(shard_size, sequences[split] - start), suffix))
    return plans


def read_done_record(directory: Path, plan: ShardPlan, fingerprint: str) -> dict | None:
    """The record of a complete shard, or None when the shard must be (re)written."""
    path = directory / plan.name
    record_path = done_record_path(path)
    if not (record_path.is_file() and path.exists()):
        return None
    record = json.loads(record_path.read_text(encoding="utf-8"))
    if record.get("fingerprint") != fingerprint or shard_sha256(path) != record.get("sha256"):
        return None
    return record


def discard_shard(directory: Path, plan: ShardPlan) -> None:
    """Remove a partial or invalid shard, its record and any temporaries of killed writers."""
    path = directory / plan.name
    for leftover in [path, done_record_path(path), *stale_temporaries(directory, plan.name),
                     *stale_temporaries(directory, done_record_path(path).name)]:
        remove_path(leftover)


class BackgroundShardWriter:
    """Writes submitted shards on ``threads`` worker threads; at most ``depth`` more wait in memory.

    Shards are independent files with their own done records, so they may
    finish in any order. Compression and hashing release the GIL, which lets
    several threads keep up with a fast GPU teacher.
    """

    def __init__(self, directory: Path, shard_format, level: int, fingerprint: str, depth: int = 2, threads: int = 1):
        self.directory, self.format, self.level, self.fingerprint = directory, shard_format, level, fingerprint
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._threads = [threading.Thread(target=self._run, name=f"shard-writer-{i}", daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, plan: ShardPlan, arrays: dict[str, np.ndarray]) -> None:
        self._raise_if_failed()
        self._queue.put((plan, arrays))

    def close(self) -> None:
        """Wait for every submitted shard to be on disk; re-raise a writer error."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing a shard to {self.directory} failed: {self._error}") from self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._write(*item)
                except BaseException as exc:  # surfaced to the producer by submit/close
                    self._error = exc

    def _write(self, plan: ShardPlan, arrays: dict[str, np.ndarray]) -> None:
        path = self.directory / plan.name
        self.format.write(path, arrays, self.level)
        record = {
            "path": plan.name,
            "split": plan.split,
            "sequences": plan.count,
            "tokens": int(arrays["input_ids"].size),
            "bytes": shard_bytes(path),
            "sha256": shard_sha256(path),
            "fingerprint": self.fingerprint,
            "plan": asdict(plan),
        }
        write_json(done_record_path(path), record)
