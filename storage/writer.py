"""The write protocol of a cache directory: claim, shards and done records, then the manifest.

1. ``claim`` writes ``fingerprint.json`` before any shard, so a directory is
   never shared by two configurations.
2. Each shard is written atomically by a background thread, then gets a
   ``<shard>.done.json`` record holding its checksum, sealed by
   ``record_sha256`` (``storage.manifest.with_seal``). Parallel parts write
   disjoint shards and need no communication. A record that is torn, edited
   or disagrees with its shard or its plan is never trusted: it is reported
   and the shard written again.
3. Once every planned shard has a valid record, ``assemble`` copies the
   tokenizer and writes ``manifest.json`` last; it is the completion marker.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from storage.atomic import (
    atomic_write,
    remove_path,
    remove_stale_temporaries,
    stale_temporaries,
    write_json,
    write_text,
)
from storage.errors import (
    DamagedRecordError,
    FingerprintMismatchError,
    ForeignDirectoryError,
    ManifestError,
)
from storage.locks import DirectoryLock
from storage.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardRecord,
    read_manifest,
    seal_is_broken,
    shard_bytes,
    shard_sha256,
    with_seal,
    write_manifest,
)

IDENTITY_NAME = "fingerprint.json"
CONFIG_NAME = "config.yaml"
TOKENIZER_DIR = "tokenizer"
DONE_SUFFIX = ".done.json"
DONE_SEAL = "record_sha256"
TOKENS_DIR = "tokens"
"""Where the token store of the packed data lives; it may precede the claim, so ``claim`` accepts it."""


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


def done_record_path(shard_path: Path) -> Path:
    return shard_path.with_name(shard_path.name + DONE_SUFFIX)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc})") from None


def refuse_foreign(path: Path) -> None:
    """Raise ``ForeignDirectoryError`` when ``path`` holds files but is not a Distillery cache (nor only a token store)."""
    # fingerprint.json is always written first, so a listing that shows other files shows it too.
    entries = [p.name for p in path.iterdir() if not p.name.startswith(".") and p.name != TOKENS_DIR]
    if entries and IDENTITY_NAME not in entries:
        raise ForeignDirectoryError(
            f"cache.dir {path} is not empty and is not a Distillery cache; choose an empty directory")


class CacheDirectory:
    """One cache directory of one fingerprint, and every step of writing it."""

    def __init__(self, path: Path, fingerprint: str):
        self.path, self.fingerprint = Path(path), fingerprint

    def is_complete(self) -> bool:
        """True for a finished cache of this fingerprint; raises if it holds another cache."""
        if not (self.path / MANIFEST_NAME).is_file():
            return False
        found = read_manifest(self.path).fingerprint
        if found != self.fingerprint:
            raise FingerprintMismatchError(
                f"{self.path} already holds a cache with fingerprint {found}, but these settings give "
                f"{self.fingerprint}; use another cache.dir, or cache.root to keep caches side by side")
        return True

    @contextmanager
    def _manifest_lock(self):
        """Held by every writer of the files that are not shards, so that its holder can clear the temporaries
        killed writers left of them."""
        lock = DirectoryLock(self.path, ".manifest.lock")
        lock.acquire("cache.dir", on_wait=lambda holder: None)
        try:
            remove_stale_temporaries(self.path, (IDENTITY_NAME, CONFIG_NAME, TOKENIZER_DIR, MANIFEST_NAME))
            yield
        finally:
            lock.release()

    def claim(self, config_yaml: str) -> None:
        """Mark the directory as this fingerprint's cache; refuse another cache's files or unrelated ones."""
        with self._manifest_lock():
            self._claim(config_yaml)

    def _claim(self, config_yaml: str) -> None:
        refuse_foreign(self.path)
        if (self.path / IDENTITY_NAME).is_file():
            found = _read_json(self.path / IDENTITY_NAME).get("fingerprint")
            if found != self.fingerprint:
                raise FingerprintMismatchError(
                    f"{self.path} holds a partial cache with fingerprint {found}, but these settings give "
                    f"{self.fingerprint}; use another cache.dir, or delete that directory to discard it")
        write_json(self.path / IDENTITY_NAME, {"fingerprint": self.fingerprint})
        write_text(self.path / CONFIG_NAME, config_yaml)

    def done_record(self, plan: ShardPlan) -> ShardRecord | None:
        """The record of a complete shard, or None when the shard was never finished.

        Raises ``DamagedRecordError`` naming the record when one exists but cannot be trusted.
        """
        path = self.path / plan.name
        record_path = done_record_path(path)
        if not record_path.is_file():
            return None  # the run died before the record was written: the shard (if any) is written again
        try:
            record = _read_json(record_path)
        except ManifestError:
            raise DamagedRecordError(f"done record {record_path} is not valid JSON") from None
        problem = self._record_problem(record, plan, path)
        if problem:
            raise DamagedRecordError(f"done record {record_path} {problem}")
        return ShardRecord(**{k: record[k] for k in ("path", "split", "sequences", "tokens", "bytes", "sha256")})

    def _record_problem(self, record, plan: ShardPlan, path: Path) -> str | None:
        """Why a parsed done record cannot be trusted, or None."""
        if not isinstance(record, dict) or seal_is_broken(record, DONE_SEAL):
            return f"does not match its {DONE_SEAL}: it was edited or damaged"
        if record.get("fingerprint") != self.fingerprint:
            return f"belongs to fingerprint {record.get('fingerprint')}, not {self.fingerprint}"
        expected = {"path": plan.name, "split": plan.split, "sequences": plan.count, "plan": asdict(plan)}
        wrong = sorted(k for k, v in expected.items() if record.get(k) != v)
        if wrong or not isinstance(record.get("tokens"), int):
            return f"does not describe shard {plan.name} as planned ({', '.join(wrong) or 'tokens'})"
        if not path.exists():
            return f"lists {path}, which is missing"
        if record.get("bytes") != shard_bytes(path) or record.get("sha256") != shard_sha256(path):
            return f"does not match the size or sha256 of {path}"
        return None

    def unfinished(self, plans: list[ShardPlan]) -> tuple[list[ShardPlan], list[str]]:
        """The shards of ``plans`` to (re)write, and one message per done record among them that was not trusted."""
        todo, damaged = [], []
        for plan in plans:
            try:
                if self.done_record(plan) is not None:
                    continue
            except DamagedRecordError as exc:
                damaged.append(str(exc))
            todo.append(plan)
        return todo, damaged

    def discard(self, plan: ShardPlan) -> None:
        """Remove a partial or invalid shard, its record and any temporaries of killed writers."""
        path = self.path / plan.name
        record = done_record_path(path)
        for leftover in [path, record, *stale_temporaries(self.path, path.name),
                         *stale_temporaries(self.path, record.name)]:
            remove_path(leftover)

    def missing(self, plans: list[ShardPlan]) -> list[str]:
        return [p.name for p in plans if not done_record_path(self.path / p.name).is_file()]

    def write_shard(self, plan: ShardPlan, shard_format, arrays: dict[str, np.ndarray], level: int) -> None:
        """Write one shard atomically, then its done record."""
        self.mark_done(plan, self.encode_shard(plan, shard_format, arrays, level))

    def encode_shard(self, plan: ShardPlan, shard_format, arrays: dict[str, np.ndarray], level: int) -> ShardRecord:
        """Encode, compress and write one shard atomically, and hash it; the shard is not done yet."""
        path = self.path / plan.name
        shard_format.write(path, arrays, level)
        return ShardRecord(plan.name, plan.split, plan.count, int(arrays["input_ids"].size), shard_bytes(path),
                           shard_sha256(path))

    def mark_done(self, plan: ShardPlan, record: ShardRecord) -> None:
        """Write the shard's done record: from now on resumes keep it and the manifest lists it."""
        path = done_record_path(self.path / plan.name)
        write_json(path, with_seal({**asdict(record), "fingerprint": self.fingerprint, "plan": asdict(plan)}, DONE_SEAL))

    def part_lock(self, part: int, parts: int, on_wait: Callable[[str], None]) -> DirectoryLock:
        """Hold part ``part`` of ``parts``: a second process started on the same part waits (``on_wait`` is told
        the holder), then finds the shards done, instead of rewriting them under the first one."""
        lock = DirectoryLock(self.path, f".part-{part}-of-{parts}.lock")
        lock.acquire("cache.dir", on_wait)
        return lock

    def assemble(self, plans: list[ShardPlan], header: Manifest, save_tokenizer: Callable[[Path], None]) -> Path | None:
        """Copy the tokenizer (``save_tokenizer(folder)``), then write ``manifest.json`` last. Parts that finish
        at the same moment take turns; only the first writes it, and the others get None."""
        with self._manifest_lock():
            return None if (self.path / MANIFEST_NAME).is_file() else self._assemble(plans, header, save_tokenizer)

    def _assemble(self, plans: list[ShardPlan], header: Manifest, save_tokenizer: Callable[[Path], None]) -> Path:
        shards = []
        for plan in plans:
            record = self.done_record(plan)
            if record is None:
                raise ManifestError(f"shard {self.path / plan.name} has no done record; "
                                    "rerun `distillery cache` to write it")
            shards.append(record)
        with atomic_write(self.path / TOKENIZER_DIR) as tmp:
            save_tokenizer(tmp)
        splits: dict[str, dict] = {}
        for shard in shards:
            totals = splits.setdefault(shard.split, {"shards": 0, "sequences": 0, "tokens": 0, "bytes": 0})
            totals["shards"] += 1
            for key in ("sequences", "tokens", "bytes"):
                totals[key] += getattr(shard, key)
        manifest = replace(header, fingerprint=self.fingerprint, tokenizer_dir=TOKENIZER_DIR, splits=splits,
                           shards=shards)
        return write_manifest(self.path, manifest)
