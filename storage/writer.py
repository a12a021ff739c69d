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

A cache at a URL is written the same way into a local working directory
(``storage.mirror``): each shard is uploaded, verified, once written and
hashed, then its done record, and the manifest last with an exclusive create.
The destination is the truth: resumes check the remote records and shards
(size and sha256), so a job requeued on another node re-uploads only what is
missing or wrong. File locks are local: two jobs on different nodes must not
run the same part of one remote cache at once (their shards would be equal
bytes, but a resume could delete one while the other uploads it).
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
from storage.mirror import Mirror

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


def _record_name(plan: ShardPlan) -> str:
    return plan.name + DONE_SUFFIX


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc})") from None


def refuse_foreign(mirror: Mirror) -> None:
    """Raise ``ForeignDirectoryError`` when the destination holds files but is not a Distillery cache (nor only a
    token store)."""
    # fingerprint.json is always written first, so a listing that shows other files shows it too.
    entries = [name for name in mirror.names() if not name.startswith(".") and name != TOKENS_DIR]
    if entries and IDENTITY_NAME not in entries:
        raise ForeignDirectoryError(
            f"cache.dir {mirror.name} is not empty and is not a Distillery cache; choose an empty directory")


class CacheDirectory:
    """One cache directory (or URL, through its local working copy) of one fingerprint, and every step of
    writing it."""

    def __init__(self, location: Mirror | Path | str, fingerprint: str):
        self.mirror = location if isinstance(location, Mirror) else Mirror(location)
        self.path, self.name, self.fingerprint = self.mirror.local, self.mirror.name, fingerprint
        self._checked: dict[str, ShardRecord] = {}  # shards found complete by this process, not measured again

    def is_complete(self) -> bool:
        """True for a finished cache of this fingerprint; raises if it holds another cache."""
        if not self.mirror.pull(MANIFEST_NAME):
            return False
        found = read_manifest(self.path).fingerprint
        if found != self.fingerprint:
            raise FingerprintMismatchError(
                f"{self.name} already holds a cache with fingerprint {found}, but these settings give "
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
        refuse_foreign(self.mirror)
        if self.mirror.pull(IDENTITY_NAME):
            self._check_claim()
        write_json(self.path / IDENTITY_NAME, {"fingerprint": self.fingerprint})
        self.mirror.publish_once(IDENTITY_NAME)
        # Read back: whoever won an exclusive create (or, on a store without one, wrote last) holds the claim.
        self.mirror.pull(IDENTITY_NAME)
        self._check_claim()
        write_text(self.path / CONFIG_NAME, config_yaml)
        self.mirror.push(CONFIG_NAME)

    def _check_claim(self) -> None:
        found = _read_json(self.path / IDENTITY_NAME).get("fingerprint")
        if found != self.fingerprint:
            raise FingerprintMismatchError(
                f"{self.name} holds a partial cache with fingerprint {found}, but these settings give "
                f"{self.fingerprint}; use another cache.dir, or delete that directory to discard it")

    def done_record(self, plan: ShardPlan) -> ShardRecord | None:
        """The record of a complete shard, or None when the shard was never finished.

        Raises ``DamagedRecordError`` naming the record when one exists but cannot be trusted.
        """
        if plan.name in self._checked:
            return self._checked[plan.name]
        if not self.mirror.pull(_record_name(plan)):
            return None  # the run died before the record was written: the shard (if any) is written again
        record_path = self.mirror.where(_record_name(plan))
        try:
            record = _read_json(self.path / _record_name(plan))
        except ManifestError:
            raise DamagedRecordError(f"done record {record_path} is not valid JSON") from None
        problem = self._record_problem(record, plan)
        if problem:
            raise DamagedRecordError(f"done record {record_path} {problem}")
        self.mirror.release(_record_name(plan))
        found = ShardRecord(**{k: record[k] for k in ("path", "split", "sequences", "tokens", "bytes", "sha256")})
        self._checked[plan.name] = found
        return found

    def _record_problem(self, record, plan: ShardPlan) -> str | None:
        """Why a parsed done record cannot be trusted, or None."""
        if not isinstance(record, dict) or seal_is_broken(record, DONE_SEAL):
            return f"does not match its {DONE_SEAL}: it was edited or damaged"
        if record.get("fingerprint") != self.fingerprint:
            return f"belongs to fingerprint {record.get('fingerprint')}, not {self.fingerprint}"
        expected = {"path": plan.name, "split": plan.split, "sequences": plan.count, "plan": asdict(plan)}
        wrong = sorted(k for k, v in expected.items() if record.get(k) != v)
        if wrong or not isinstance(record.get("tokens"), int):
            return f"does not describe shard {plan.name} as planned ({', '.join(wrong) or 'tokens'})"
        measured = self.mirror.measure(plan.name)
        if measured is None:
            return f"lists {self.mirror.where(plan.name)}, which is missing"
        if (record.get("bytes"), record.get("sha256")) != measured:
            return f"does not match the size or sha256 of {self.mirror.where(plan.name)}"
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
        self._checked.pop(plan.name, None)
        for name in (plan.name, _record_name(plan)):
            self.mirror.remove(name)
            for leftover in stale_temporaries(self.path, name):
                remove_path(leftover)

    def missing(self, plans: list[ShardPlan]) -> list[str]:
        present = set(self.mirror.names())
        return [p.name for p in plans if _record_name(p) not in present]

    def write_shard(self, plan: ShardPlan, shard_format, columns: dict[str, np.ndarray], level: int) -> None:
        """Write one shard's stored columns (``storage.layout``) atomically, then its done record."""
        self.mark_done(plan, self.encode_shard(plan, shard_format, columns, level))

    def encode_shard(self, plan: ShardPlan, shard_format, columns: dict[str, np.ndarray], level: int) -> ShardRecord:
        """Compress and write one shard's stored columns atomically, and hash it; the shard is not done yet."""
        path = self.path / plan.name
        shard_format.write(path, columns, level)
        return ShardRecord(plan.name, plan.split, plan.count, int(columns["input_ids"].size), shard_bytes(path),
                           shard_sha256(path))

    def mark_done(self, plan: ShardPlan, record: ShardRecord) -> None:
        """Write the shard's done record (uploading the shard, then the record, to a remote cache): from now on
        resumes keep it and the manifest lists it."""
        write_json(self.path / _record_name(plan),
                   with_seal({**asdict(record), "fingerprint": self.fingerprint, "plan": asdict(plan)}, DONE_SEAL))
        for name in (plan.name, _record_name(plan)):
            self.mirror.push(name)
        for name in (plan.name, _record_name(plan)):
            self.mirror.release(name)
        self._checked[plan.name] = record

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
            return None if self.mirror.exists(MANIFEST_NAME) else self._assemble(plans, header, save_tokenizer)

    def _assemble(self, plans: list[ShardPlan], header: Manifest, save_tokenizer: Callable[[Path], None]) -> Path:
        shards = []
        for plan in plans:
            record = self.done_record(plan)
            if record is None:
                raise ManifestError(f"shard {self.mirror.where(plan.name)} has no done record; "
                                    "rerun `distillery cache` to write it")
            shards.append(record)
        with atomic_write(self.path / TOKENIZER_DIR) as tmp:
            save_tokenizer(tmp)
        self.mirror.push(TOKENIZER_DIR)
        splits: dict[str, dict] = {}
        for shard in shards:
            totals = splits.setdefault(shard.split, {"shards": 0, "sequences": 0, "tokens": 0, "bytes": 0})
            totals["shards"] += 1
            for key in ("sequences", "tokens", "bytes"):
                totals[key] += getattr(shard, key)
        manifest = replace(header, fingerprint=self.fingerprint, tokenizer_dir=TOKENIZER_DIR, splits=splits,
                           shards=shards)
        path = write_manifest(self.path, manifest)
        return path if self.mirror.publish_once(MANIFEST_NAME) else None
