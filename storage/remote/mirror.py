"""A destination that is either a local directory or a URL, worked on through one local directory.

Stages write into ``Mirror.local`` as into any output directory and ``push`` each piece once it is complete;
they read what a destination holds with ``pull``. For a local destination ``local`` is the destination itself,
so pushing and pulling do nothing. For a URL, ``local`` is a working directory under ``cache.local_dir``, and
the destination is the truth: ``pull`` makes the local copy match it, and a job requeued on another node finds
everything it pushed. Object stores have no rename and no lock, so completion markers (a manifest, a
checkpoint's ``state.json``) are pushed after what they describe, and claims use an exclusive create.
"""
from __future__ import annotations

import getpass
import hashlib
import os
import re
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

from storage.errors import CacheNotFoundError
from storage.io.atomic import remove_path
from storage.io.hashing import tree_bytes, tree_sha256
from storage.remote import fs as remote

DEFAULT_LOCAL_BYTES = 20 * 10**9
"""The default byte budget of the local copies of remote shards (``cache.local_bytes``)."""


def default_local_dir() -> Path:
    """Where local copies of remote caches and outputs go by default: a per-user folder of the system temp dir."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, as in some containers
        user = str(os.getuid())
    return Path(tempfile.gettempdir()) / f"distillery-{user}"


def join(location: str | os.PathLike, *names: str) -> str | Path:
    """``location/names...``: a URL for a URL, a ``Path`` for a local path."""
    if remote.is_url(location):
        return "/".join([str(location).rstrip("/"), *names])
    return Path(location, *names)


def _staging_name(url: str) -> str:
    """A readable, unique folder name for a URL's local working copy."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[1]).strip("_")[-60:]
    return f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"


class Mirror(ABC):
    """A local directory, or a URL with a local working copy; ``name`` is what the user gave, for messages.

    ``Mirror(destination, local_dir)`` gives a ``LocalMirror`` or a ``RemoteMirror``, as ``pathlib.Path`` gives
    a path of the running system: the stages write the same code for both.
    """

    name: str
    local: Path

    def __new__(cls, destination: str | os.PathLike, local_dir: str | os.PathLike | None = None):
        if cls is Mirror:
            cls = RemoteMirror if remote.is_url(destination) else LocalMirror
        return super().__new__(cls)

    def __repr__(self) -> str:
        return f"Mirror({self.name!r})"

    def where(self, relative: str) -> str:
        """The destination's own name for ``relative``, for messages."""
        return str(join(self.name, relative))

    @abstractmethod
    def exists(self, relative: str) -> bool:
        """Whether the destination holds ``relative``."""

    @abstractmethod
    def names(self, relative: str = "") -> list[str]:
        """What the destination holds directly under ``relative`` (hidden names included)."""

    @abstractmethod
    def pull(self, relative: str) -> bool:
        """Make the local copy of ``relative`` (a file or a folder) match the destination; False when the
        destination has none (then no local copy is left either)."""

    @abstractmethod
    def push(self, relative: str, last: tuple[str, ...] = ()) -> None:
        """Upload the local ``relative`` (a file, or a folder with the names in ``last`` uploaded last)."""

    @abstractmethod
    def publish_once(self, relative: str) -> bool:
        """Upload the local file ``relative`` unless the destination has one already (an exclusive create);
        False when it had."""

    @abstractmethod
    def remove(self, relative: str) -> None:
        """Delete ``relative`` locally and at the destination."""

    @abstractmethod
    def measure(self, relative: str) -> tuple[int, str] | None:
        """``(bytes, sha256)`` of a shard at the destination, or None when it is missing."""

    @abstractmethod
    def release(self, relative: str) -> None:
        """Drop the local copy of something pushed, to keep the working directory small."""


class LocalMirror(Mirror):
    """A local destination: the working copy is the destination, so pushing and pulling do nothing."""

    def __init__(self, destination: str | os.PathLike, local_dir: str | os.PathLike | None = None):
        self.name, self.local = str(destination), Path(destination)

    def exists(self, relative: str) -> bool:
        return (self.local / relative).exists()

    def names(self, relative: str = "") -> list[str]:
        folder = self.local / relative
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def pull(self, relative: str) -> bool:
        return (self.local / relative).exists()

    def push(self, relative: str, last: tuple[str, ...] = ()) -> None:
        """Nothing to upload."""

    def publish_once(self, relative: str) -> bool:
        """The destination has it already, as its own writer made it under a lock."""
        return True

    def remove(self, relative: str) -> None:
        remove_path(self.local / relative)

    def measure(self, relative: str) -> tuple[int, str] | None:
        path = self.local / relative
        return (tree_bytes(path), tree_sha256(path)) if path.exists() else None

    def release(self, relative: str) -> None:
        """Kept: it is the destination."""


class RemoteMirror(Mirror):
    """A URL, worked on through a local copy under ``local_dir``; the URL is the truth."""

    def __init__(self, destination: str | os.PathLike, local_dir: str | os.PathLike | None = None):
        self.name = str(destination)
        self.url = self.name.rstrip("/")
        self.local = Path(local_dir or default_local_dir()) / "mirrors" / _staging_name(self.url)

    def exists(self, relative: str) -> bool:
        return remote.exists(join(self.url, relative))

    def names(self, relative: str = "") -> list[str]:
        return remote.child_names(join(self.url, relative) if relative else self.url)

    def pull(self, relative: str) -> bool:
        path, source = self.local / relative, join(self.url, relative)
        if not remote.exists(source):
            remove_path(path)
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        remote.download(source, path)
        return True

    def push(self, relative: str, last: tuple[str, ...] = ()) -> None:
        remote.upload_tree(self.local / relative, join(self.url, relative), last)

    def publish_once(self, relative: str) -> bool:
        return remote.create_exclusive(join(self.url, relative), (self.local / relative).read_bytes())

    def remove(self, relative: str) -> None:
        remove_path(self.local / relative)
        remote.remove(join(self.url, relative))

    def measure(self, relative: str) -> tuple[int, str] | None:
        return remote.measure(join(self.url, relative))

    def release(self, relative: str) -> None:
        remove_path(self.local / relative)


def local_folder(location: str | os.PathLike, local_dir: str | os.PathLike | None = None) -> Path:
    """A local path to the folder at ``location``: the folder itself, or a fresh copy of a URL's (a model to load,
    say), under ``local_dir``."""
    if not remote.is_url(location):
        return Path(location)
    url = str(location).rstrip("/")
    parent, name = url.rsplit("/", 1)
    mirror = Mirror(parent, local_dir)
    if not mirror.pull(name):
        raise CacheNotFoundError(f"{url} does not exist")
    return mirror.local / name
