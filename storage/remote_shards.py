"""Opening a cache by location: a local directory, or a URL whose shards are fetched into a bounded local cache.

``open_cache`` is what every reader calls. For a URL it downloads ``manifest.json`` (its seal is checked as
for a local one) and attaches a ``RemoteShards``: the manifest's ``shard_path`` then returns a verified local
copy from ``storage.shard_cache.ShardCache``, downloaded on first use and shared by every process of the node,
and ``verify`` checks the remote objects themselves.
"""
from __future__ import annotations

import os
from pathlib import Path

from storage import remote
from storage.errors import CacheNotFoundError, ChecksumError
from storage.manifest import MANIFEST_NAME, Manifest, ShardRecord, read_manifest, shard_sha256
from storage.mirror import DEFAULT_LOCAL_BYTES, Mirror, default_local_dir, join
from storage.shard_cache import ShardCache

PREFETCH_SHARDS = 2
"""Shards of the epoch order downloaded ahead of the reader (fewer when the byte budget is tight)."""


class RemoteShards:
    """The shards of a cache at ``url``, as local copies under ``local_dir`` within ``local_bytes``."""

    def __init__(self, url: str, mirror: Mirror, shards: ShardCache):
        self.url, self.mirror, self.shards = url, mirror, shards

    def _source(self, record: ShardRecord) -> tuple[str, str, int]:
        return join(self.url, record.path), record.sha256, record.bytes

    def fetch(self, record: ShardRecord) -> Path:
        return self.shards.fetch(*self._source(record))

    def fetch_checked(self, record: ShardRecord) -> Path:
        """A local copy that is hashed now, not only when it was downloaded."""
        path = self.fetch(record)
        if shard_sha256(path) != record.sha256:
            raise ChecksumError(f"the local copy {path} of {join(self.url, record.path)} was damaged after it was "
                                "downloaded (check the disk of cache.local_dir); delete it and rerun")
        return path

    def prefetch(self, records: list[ShardRecord]) -> None:
        self.shards.prefetch([self._source(r) for r in records])

    def problem(self, record: ShardRecord) -> str | None:
        """Why the remote shard is not the one the manifest lists, or None."""
        url = join(self.url, record.path)
        measured = remote.measure(url)
        if measured is None:
            return f"missing: {url}"
        return None if measured == (record.bytes, record.sha256) else f"checksum mismatch: {url}"

    def folder(self, relative: str) -> Path:
        """A local copy of a folder of the cache (its tokenizer)."""
        if not self.mirror.pull(relative):
            raise CacheNotFoundError(f"{join(self.url, relative)} is missing from the cache; rebuild it")
        return self.mirror.local / relative


def open_cache(location: str | os.PathLike, local_dir: str | os.PathLike | None = None,
               local_bytes: int = DEFAULT_LOCAL_BYTES) -> Manifest:
    """The manifest of the complete cache at ``location`` (a directory or a URL), ready to read shards from."""
    if not remote.is_url(location):
        return read_manifest(location)
    url = str(location).rstrip("/")
    mirror = Mirror(url, local_dir)
    if not mirror.pull(MANIFEST_NAME):
        if not mirror.names():
            raise CacheNotFoundError(f"{url} does not exist (no bucket, or nothing stored under it); check the URL")
        raise CacheNotFoundError(f"no {MANIFEST_NAME} in {url}: it is not a complete Distillery cache "
                                 "(run or finish `distillery cache` for it first)")
    manifest = read_manifest(mirror.local, name=url)
    shards = ShardCache(Path(local_dir or default_local_dir()) / "shards", local_bytes)
    manifest.remote = RemoteShards(url, mirror, shards)
    return manifest
