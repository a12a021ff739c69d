"""Manifest, fingerprints and shard checksums.

``manifest.json`` is written last and atomically; it is the only marker of a
complete cache. Each finished shard also gets a small ``<shard>.done.json``
record so that resumed or partitioned runs can tell complete shards from
partial ones before the manifest exists.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from storage.atomic import write_text
from storage.errors import CacheNotFoundError, ChecksumError

FORMAT_VERSION = 2  # 2: token ids stored as uint16 when they fit
MANIFEST_NAME = "manifest.json"
DONE_SUFFIX = ".done.json"
_BLOCK = 1 << 22


def fingerprint(identity: dict) -> str:
    """A short stable hash of a JSON-serialisable identity dictionary."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _update_with_file(digest, path: Path) -> None:
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)


def shard_sha256(path: Path) -> str:
    """sha256 of a shard file, or of a shard directory's files.

    For a directory the digest runs over its files in sorted relative-path
    order, each contributing ``relative/path`` + ``NUL`` + its bytes.
    """
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
            _update_with_file(digest, file)
    else:
        _update_with_file(digest, path)
    return digest.hexdigest()


def shard_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def done_record_path(shard_path: Path) -> Path:
    return shard_path.with_name(shard_path.name + DONE_SUFFIX)


@dataclass
class Manifest:
    """A loaded ``manifest.json`` and the directory it describes."""

    directory: Path
    data: dict

    @property
    def shards(self) -> list[dict]:
        return self.data["shards"]

    def shards_for(self, split: str) -> list[dict]:
        return [s for s in self.shards if s["split"] == split]

    def shard_path(self, record: dict) -> Path:
        return self.directory / record["path"]

    def verify(self) -> list[str]:
        """Re-hash every listed shard; return one message per bad or missing shard."""
        problems = []
        for record in self.shards:
            path = self.shard_path(record)
            if not path.exists():
                problems.append(f"missing: {path}")
            elif shard_sha256(path) != record["sha256"]:
                problems.append(f"checksum mismatch: {path}")
        return problems

    def check_shard(self, record: dict) -> Path:
        """Return the shard's path after verifying its checksum."""
        path = self.shard_path(record)
        if not path.exists():
            raise CacheNotFoundError(f"shard {path} listed in {self.directory / MANIFEST_NAME} is missing")
        if shard_sha256(path) != record["sha256"]:
            raise ChecksumError(
                f"shard {path} does not match its sha256 in the manifest; "
                f"the cache is corrupt: run `distillery verify {self.directory}` and rebuild it"
            )
        return path


def read_manifest(directory: str | Path) -> Manifest:
    """Load the manifest of a complete cache, or raise ``CacheNotFoundError``."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise CacheNotFoundError(
            f"no {MANIFEST_NAME} in {directory}: it is not a complete Distillery cache "
            f"(run or finish `distillery cache` for it first)"
        )
    with open(path, encoding="utf-8") as handle:
        return Manifest(directory, json.load(handle))
