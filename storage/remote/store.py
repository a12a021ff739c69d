"""Opening a cache by location: its manifest, and a ``ShardStore`` that gives local, verified paths to its shards.

One small interface, two implementations, the way zarr has ``LocalStore`` and ``FsspecStore``: ``LocalShards``
reads a directory in place; ``RemoteShards`` reads a cache at a URL through copies of its shards in
``storage.remote.copies.LocalCopies``, downloaded on first use, hashed before they are used, and shared by every
process of the node. ``open_cache`` is what every reader calls; it checks the manifest's seal either way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from storage.errors import CacheNotFoundError, ChecksumError, ManifestError
from storage.io.hashing import tree_sha256
from storage.manifest import MANIFEST_NAME, Manifest, ShardRecord, read_manifest
from storage.remote import fs as remote
from storage.remote.copies import LocalCopies
from storage.remote.mirror import DEFAULT_LOCAL_BYTES, Mirror, default_local_dir, join

PREFETCH_SHARDS = 2
"""Shards of the epoch order downloaded ahead of the reader (fewer when the byte budget is tight)."""


class ShardStore(Protocol):
    """Where a cache's shards are, as local paths."""

    location: str
    """The cache as the user named it: a directory or a URL."""

    def path(self, record: ShardRecord) -> Path:
        """A local path to the shard (a remote one's copy was hashed when it was downloaded)."""

    def checked_path(self, record: ShardRecord) -> Path:
        """A local path to the shard, hashed now; ``CacheNotFoundError`` or ``ChecksumError`` when it is bad."""

    def problem(self, record: ShardRecord) -> str | None:
        """Why the stored shard is not the one the manifest lists (missing, or another checksum), or None."""

    def folder(self, relative: str) -> Path:
        """A local path to a folder of the cache (its tokenizer)."""

    def prefetch(self, records: list[ShardRecord]) -> None:
        """Start fetching these shards in the background, where fetching costs anything."""

    def close(self) -> None:
        """Stop background work and let go of the shards in use."""


class LocalShards:
    """The shards of a cache directory, read in place."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.location = str(directory)

    def path(self, record: ShardRecord) -> Path:
        """Refused when the shard (or a symlink on the way) leads out of the cache directory."""
        path = self.directory / record.path
        if not path.resolve().is_relative_to(self.directory.resolve()):
            raise ManifestError(f"shard {record.path!r} in {self.directory / MANIFEST_NAME} leads outside the cache "
                                "directory (a symlink); the cache is tampered or damaged: rebuild it")
        return path

    def checked_path(self, record: ShardRecord) -> Path:
        path = self.path(record)
        if not path.exists():
            raise CacheNotFoundError(f"shard {path} listed in {self.directory / MANIFEST_NAME} is missing")
        if tree_sha256(path) != record.sha256:
            raise ChecksumError(f"shard {path} does not match its sha256 in the manifest; the cache is corrupt: "
                                f"run `distillery verify {self.location}` and rebuild it")
        return path

    def problem(self, record: ShardRecord) -> str | None:
        path = self.path(record)
        if not path.exists():
            return f"missing: {path}"
        return None if tree_sha256(path) == record.sha256 else f"checksum mismatch: {path}"

    def folder(self, relative: str) -> Path:
        return self.directory / relative

    def prefetch(self, records: list[ShardRecord]) -> None:
        """Nothing to do: the shards are on this disk."""

    def close(self) -> None:
        """Nothing to do: no background work."""


class RemoteShards:
    """The shards of a cache at ``url``, as local copies under ``local_dir`` within ``local_bytes``."""

    def __init__(self, url: str, mirror: Mirror, copies: LocalCopies):
        self.location, self.mirror, self.copies = url, mirror, copies

    def _source(self, record: ShardRecord) -> tuple[str, str, int]:
        return join(self.location, record.path), record.sha256, record.bytes

    def path(self, record: ShardRecord) -> Path:
        return self.copies.fetch(*self._source(record))

    def checked_path(self, record: ShardRecord) -> Path:
        path = self.path(record)
        if tree_sha256(path) != record.sha256:
            raise ChecksumError(f"the local copy {path} of {join(self.location, record.path)} was damaged after it "
                                "was downloaded (check the disk of cache.local_dir); delete it and rerun")
        return path

    def problem(self, record: ShardRecord) -> str | None:
        url = join(self.location, record.path)
        measured = remote.measure(url)
        if measured is None:
            return f"missing: {url}"
        return None if measured == (record.bytes, record.sha256) else f"checksum mismatch: {url}"

    def folder(self, relative: str) -> Path:
        if not self.mirror.pull(relative):
            raise CacheNotFoundError(f"{join(self.location, relative)} is missing from the cache; rebuild it")
        return self.mirror.local / relative

    def prefetch(self, records: list[ShardRecord]) -> None:
        self.copies.prefetch([self._source(r) for r in records])

    def close(self) -> None:
        self.copies.close()


@dataclass
class Cache:
    """A complete cache, opened: what its manifest says, and where its shards are."""

    manifest: Manifest
    store: ShardStore

    @property
    def location(self) -> str:
        return self.store.location

    def verify(self, records: list[ShardRecord] | None = None) -> list[str]:
        """Re-hash ``records`` (default: every listed shard); return one message per bad or missing shard."""
        records = self.manifest.shards if records is None else records
        return [problem for record in records if (problem := self.store.problem(record))]


def open_cache(location: str | os.PathLike, local_dir: str | os.PathLike | None = None,
               local_bytes: int = DEFAULT_LOCAL_BYTES) -> Cache:
    """The complete cache at ``location`` (a directory or a URL), ready to read shards from."""
    if not remote.is_url(location):
        return Cache(read_manifest(location), LocalShards(location))
    url = str(location).rstrip("/")
    mirror = Mirror(url, local_dir)
    if not mirror.pull(MANIFEST_NAME):
        if not mirror.names():
            raise CacheNotFoundError(f"{url} does not exist (no bucket, or nothing stored under it); check the URL")
        raise CacheNotFoundError(f"no {MANIFEST_NAME} in {url}: it is not a complete Distillery cache "
                                 "(run or finish `distillery cache` for it first)")
    manifest = read_manifest(mirror.local, name=url)
    copies = LocalCopies(Path(local_dir or default_local_dir()) / "shards", local_bytes)
    return Cache(manifest, RemoteShards(url, mirror, copies))
