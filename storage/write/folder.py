"""The write protocol of a folder of shards: claim, shards and done records, then the manifest, last.

Any stage whose output is a folder of shards writes it this way (a cache is one, ``storage.write.cache``):

1. ``claim`` writes ``fingerprint.json`` before any shard, so a folder is
   never shared by two configurations, and ``config.yaml`` beside it.
2. Each shard is written atomically, then gets a ``<shard>.done.json``
   record holding its checksum, sealed by ``record_sha256``
   (``storage.io.seals``). Parallel parts write disjoint shards and need no
   communication. A record that is torn, edited or disagrees with its shard
   or its plan is never trusted: it is reported and the shard written again.
3. Once every planned shard has a valid record, ``finish`` writes
   ``manifest.json`` last; it is the completion marker.

A folder at a URL is written the same way into a local working directory
(``storage.remote.mirror``): each shard is uploaded, verified, once written and
hashed, then its done record, and the manifest last with an exclusive create.
The destination is the truth: resumes check the remote records and shards
(size and sha256), so a job requeued on another node re-uploads only what is
missing or wrong. File locks are local: two jobs on different nodes must not
run the same part of one remote folder at once (their shards would be equal
bytes, but a resume could delete one while the other uploads it).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from storage.errors import (
    DamagedRecordError,
    FingerprintMismatchError,
    ForeignDirectoryError,
    ManifestError,
)
from storage.io.atomic import (
    ensure_writable,
    remove_path,
    remove_stale_temporaries,
    stale_temporaries,
    write_json,
    write_text,
)
from storage.io.hashing import tree_bytes, tree_sha256
from storage.io.locks import DirectoryLock
from storage.io.seals import read_sealed, seal_is_broken, with_seal
from storage.manifest import MANIFEST_NAME, MANIFEST_SEAL, ShardRecord
from storage.remote.mirror import Mirror

IDENTITY_NAME = "fingerprint.json"
CONFIG_NAME = "config.yaml"
"""The YAML of the settings an output folder was made with: every cache, training and run directory has one."""
DONE_SUFFIX = ".done.json"
DONE_SEAL = "record_sha256"


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


class ShardFolder:
    """One folder of shards (or URL, through its local working copy) of one fingerprint, and every step of
    writing it. Subclasses say what the folder is (``key``, ``what``, ``allowed``) and write the manifest."""

    key = "out_dir"
    """The setting that names the folder, for messages."""
    what = "a Distillery output folder"
    allowed: tuple[str, ...] = ()
    """Names that may be in the folder before it is claimed."""
    extra_names: tuple[str, ...] = ()
    """Files and folders besides the shards that writers replace under the manifest lock."""
    elsewhere: str | None = None
    """What to do when the folder holds another configuration's output (default: use another ``key``)."""

    def __init__(self, location: Mirror | Path | str, fingerprint: str):
        self.mirror = location if isinstance(location, Mirror) else Mirror(location)
        self.path, self.name, self.fingerprint = self.mirror.local, self.mirror.name, fingerprint
        self._checked: dict[str, ShardRecord] = {}  # shards found complete by this process, not measured again

    @classmethod
    def refuse_foreign(cls, mirror: Mirror) -> None:
        """Raise ``ForeignDirectoryError`` when the destination holds files but is not such a folder (names in
        ``allowed`` may precede the claim); called before anything is written there."""
        # fingerprint.json is always written first, so a listing that shows other files shows it too.
        entries = [name for name in mirror.names() if not name.startswith(".") and name not in cls.allowed]
        if entries and IDENTITY_NAME not in entries:
            raise ForeignDirectoryError(f"{cls.key} {mirror.name} is not empty and is not {cls.what}; "
                                        "choose an empty directory")

    def manifest_fingerprint(self) -> str | None:
        """The fingerprint the finished folder's manifest (pulled into ``path``) records."""
        return read_sealed(self.path / MANIFEST_NAME, MANIFEST_SEAL, ManifestError).get("fingerprint")

    def is_complete(self) -> bool:
        """True for a finished folder of this fingerprint; raises if it holds another configuration's."""
        if not self.mirror.pull(MANIFEST_NAME):
            return False
        found = self.manifest_fingerprint()
        if found != self.fingerprint:
            raise FingerprintMismatchError(
                f"{self.name} already holds {self.what} with fingerprint {found}, but these settings give "
                f"{self.fingerprint}; {self.elsewhere or f'use another {self.key}'}")
        return True

    def begin(self, config_yaml: str) -> bool:
        """True when the folder is already complete for this fingerprint (a hit); otherwise check that it can be
        written, claim it, and return False."""
        if self.is_complete():
            return True
        ensure_writable(self.path, self.key)
        self.claim(config_yaml)
        return False

    @contextmanager
    def _manifest_lock(self):
        """Held by every writer of the files that are not shards, so that its holder can clear the temporaries
        killed writers left of them."""
        lock = DirectoryLock(self.path, ".manifest.lock")
        lock.acquire(self.key, on_wait=lambda holder: None)
        try:
            remove_stale_temporaries(self.path, (IDENTITY_NAME, CONFIG_NAME, *self.extra_names, MANIFEST_NAME))
            yield
        finally:
            lock.release()

    def claim(self, config_yaml: str) -> None:
        """Mark the folder as this fingerprint's; refuse another configuration's files or unrelated ones."""
        with self._manifest_lock():
            self._claim(config_yaml)

    def _claim(self, config_yaml: str) -> None:
        self.refuse_foreign(self.mirror)
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
                f"{self.name} holds a partial {self.what.removeprefix('a ')} with fingerprint {found}, but these "
                f"settings give {self.fingerprint}; use another {self.key}, or delete that directory to discard it")

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

    def record(self, plan: ShardPlan, tokens: int) -> ShardRecord:
        """Hash the shard just written atomically at ``path / plan.name``; it is not done yet (``mark_done``)."""
        path = self.path / plan.name
        return ShardRecord(plan.name, plan.split, plan.count, tokens, tree_bytes(path), tree_sha256(path))

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
        lock.acquire(self.key, on_wait)
        return lock

    def finish(self, plans: list[ShardPlan], write_manifest: Callable[[list[ShardRecord]], Path]) -> Path | None:
        """Write the manifest last: ``write_manifest(records)`` writes it into ``path`` from the done records of
        ``plans``, then it is published. Parts that finish at the same moment take turns; only the first writes
        it, and the others get None."""
        with self._manifest_lock():
            if self.mirror.exists(MANIFEST_NAME):
                return None
            path = write_manifest([self._done(plan) for plan in plans])
            return path if self.mirror.publish_once(MANIFEST_NAME) else None

    def _done(self, plan: ShardPlan) -> ShardRecord:
        record = self.done_record(plan)
        if record is None:
            raise ManifestError(f"shard {self.mirror.where(plan.name)} has no done record; rerun the job to write it")
        return record
