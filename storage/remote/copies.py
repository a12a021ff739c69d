"""A local copy of remote shards within a byte budget, shared by every process on a node that uses one directory.

Entries are content addressed, ``<sha256><suffix>``, so two jobs (or two torchrun ranks) reading one shard share
one copy, and an entry never needs to be checked again: it is only ever moved into place whole, after its bytes
were hashed. All coordination is ``flock`` on files under ``.locks/``. The kernel drops a lock when its holder
dies, however it dies, so no lock is ever stale; and two threads of one process conflict as two processes do,
because each takes its lock through a handle of its own.

- ``.locks/<sha256>.lock``: exclusive while its entry is downloaded (the file then holds the bytes the download
  will take) or deleted; shared while a process uses the entry: the shard it fetched last (which its reader is
  about to open) and those it prefetched and has not fetched yet. Nothing deletes an entry someone holds.
- ``.locks/evict.lock``: held while choosing what to delete, so two downloads never count the same free bytes.

The budget holds for the entries present plus the downloads in flight, except that entries in use are never
deleted: when they leave no room, ``fetch`` goes over the budget by at most those entries. A prefetch starts only
when it leaves room for one more shard of its size, and a fetch that must download gives up this process's
prefetched entries first, so a reader whose budget holds two shards per process stays within it even when its
reads are not the ones foreseen. Deleting a file that another process has open or memory-mapped is safe on
Linux, but its blocks are freed only when that reader closes it. A Zarr shard's entry is a folder, counted
by the bytes of its files.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from pathlib import Path, PurePosixPath

from storage.errors import CacheError, ManifestError
from storage.io.atomic import TMP_MARKER, remove_path
from storage.io.hashing import tree_bytes
from storage.io.locks import DirectoryLock, lock_file, unlock
from storage.remote import fs as remote
from storage.remote.mirror import DEFAULT_LOCAL_BYTES

LOCKS = ".locks"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RETRY_SECONDS = 0.01
log = logging.getLogger(__name__)


class LocalCopiesFullError(CacheError, ValueError):
    """One shard alone is larger than the budget of the local shard cache."""


def _reserved(path: Path) -> int:
    """The bytes a download in flight wrote into its lock file; 0 while it has not yet written them."""
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text() or 0)
    return 0


class LocalCopies:
    """Local copies of remote shards under `directory`, at most `budget` bytes of them."""

    def __init__(self, directory: Path, budget: int = DEFAULT_LOCAL_BYTES):
        self.directory = Path(directory)
        self.budget = budget
        self._pid = None  # threads, locks and handles are made on first use in each process (see _local)

    def __getstate__(self) -> dict:
        """Only the settings travel: the copy, in a DataLoader worker say, makes its own threads and locks."""
        return {"directory": self.directory, "budget": self.budget}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _local(self) -> threading.Lock:
        """This process's state, made on first use, and again in a forked child: that must not use the thread,
        mutex or lock handles it inherited (its parent's; the thread does not even exist in the child), nor
        unlock them, which would unlock them for the parent too."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._mutex = threading.Lock()
            self._wake = threading.Condition(self._mutex)
            self._queue: list[tuple[str, str, int]] = []  # prefetches not started
            self._generation = 0  # counts prefetch calls, so a stop ends only the queue it was part of
            self._wanted: set[str] = set()  # sha256s of the latest prefetch call, not fetched yet
            self._held: dict = {}  # sha256 -> shared lock of an entry prefetched and not fetched yet
            self._last = None  # shared lock of the entry fetched last
            self._thread = self._stop = None
            self._busy = False  # the prefetch thread is downloading
            self._fetching = threading.Lock()
            (self.directory / LOCKS).mkdir(parents=True, exist_ok=True)
        return self._mutex

    def fetch(self, url: str, sha256: str, size: int) -> Path:
        """The local verified copy of the shard at `url` (a file or a folder); downloads it on first use."""
        entry = self._entry(url, sha256)
        if size > self.budget:
            raise LocalCopiesFullError(f"cache.local_bytes {self.budget} is smaller than shard {url} ({size} bytes); "
                                      "raise cache.local_bytes")
        self._local()
        with self._fetching:  # two readers of one process (training and evaluation) download one at a time
            if not entry.exists():
                self._give_up_prefetched(sha256)  # a read that prefetching did not foresee: its guesses may go
            handle = self._acquire(url, sha256, size, entry, required=True)
        os.utime(entry)  # most recently used: the last entry anyone evicts
        with self._mutex:
            self._wanted.discard(sha256)
            done = [self._last, self._held.pop(sha256, None)]
            self._last = handle
        for old in done:
            if old is not None:
                unlock(old)
        return entry

    def prefetch(self, items: list[tuple[str, str, int]]) -> None:
        """Start downloading these (url, sha256, size) in order on ONE background thread, skipping those present,
        stopping when the next one would not fit the budget alongside the entries in use; a later call replaces
        the pending queue. Errors in prefetch are swallowed (logged at debug): fetch() will retry and raise them.

        Entries it brings in stay in use (never evicted) until fetched or left out of a later call."""
        with self._local():
            self._generation += 1
            self._queue = list(items)
            self._wanted = {sha256 for _, sha256, _ in items}
            dropped = [self._held.pop(sha) for sha in list(self._held) if sha not in self._wanted]
            if self._thread is None:
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._run, args=(self._stop,), name="shard-prefetch",
                                                daemon=True)
                self._thread.start()
            self._wake.notify()
        for handle in dropped:
            unlock(handle)

    def _give_up_prefetched(self, keep: str) -> None:
        """Cancel the pending prefetches and let go of the entries prefetched and not fetched yet (but ``keep``),
        so that room can be made from them."""
        with self._wake:
            self._generation += 1
            self._queue, self._wanted = [], {keep} & self._wanted
            while self._busy:  # a download under way becomes an entry that room can be made from
                self._wake.wait()
            dropped = [self._held.pop(sha) for sha in list(self._held) if sha != keep]
        for handle in dropped:
            unlock(handle)

    def close(self) -> None:
        """Stop the prefetch thread (after the download it is in, which is atomic) and let go of every entry in
        use; the cache can still be used afterwards."""
        if self._pid != os.getpid():
            return  # nothing of this process's own to stop
        with self._mutex:
            thread, stop, self._thread = self._thread, self._stop, None
            handles = [*self._held.values(), self._last]
            self._queue, self._wanted, self._held, self._last = [], set(), {}, None
            if stop is not None:
                stop.set()
                self._wake.notify_all()
        if thread is not None:
            thread.join()
        for handle in handles:
            if handle is not None:
                unlock(handle)

    def bytes_on_disk(self) -> int:
        """Bytes of the entries present (temporaries of downloads in flight are not counted)."""
        if not self.directory.is_dir():
            return 0
        return sum(size for _, _, size in self._entries().values())

    def _entry(self, url: str, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise ManifestError(f"{url}: its sha256 {sha256!r} is not 64 lowercase hex digits")
        return self.directory / (sha256 + PurePosixPath(url).suffix)

    def _lock_path(self, sha256: str) -> Path:
        return self.directory / LOCKS / f"{sha256}.lock"

    def _entries(self) -> dict[str, tuple[Path, int, int]]:
        """``sha256 -> (path, mtime in ns, bytes)`` of the entries present (a Zarr shard's entry is a folder)."""
        found = {}
        for path in self.directory.iterdir():
            if _SHA256.match(path.name):
                with contextlib.suppress(FileNotFoundError):  # evicted meanwhile
                    found[path.name[:64]] = (path, path.stat().st_mtime_ns, tree_bytes(path))
        return found

    def _acquire(self, url: str, sha256: str, size: int, entry: Path, required: bool):
        """A shared lock on ``entry`` once it is present, downloading it first unless someone else is (then this
        waits for them); None when it is absent and, not ``required``, would not fit beside the entries in use."""
        lock_path = self._lock_path(sha256)
        while True:
            shared = lock_file(lock_path, shared=True)  # waits while another process or thread downloads it
            if entry.exists():
                return shared
            unlock(shared)
            exclusive = lock_file(lock_path, wait=False)
            if exclusive is None:  # someone took it in between: wait for them above
                time.sleep(_RETRY_SECONDS)
                continue
            try:
                if not entry.exists() and not self._download(url, sha256, size, entry, exclusive, required):
                    return None
            finally:
                unlock(exclusive)

    def _download(self, url: str, sha256: str, size: int, entry: Path, exclusive, required: bool) -> bool:
        """Make room and download ``entry``, holding its lock exclusively with ``size`` written in it for others'
        accounting; False when there was no room and the download was not ``required``."""
        exclusive.truncate(0)
        exclusive.write(f"{size}\n")
        exclusive.flush()
        try:
            if not self._make_room(sha256, size, required):
                return False
            remote.download_verified(url, entry, sha256)
        finally:
            exclusive.truncate(0)
            if not entry.exists():
                self._lock_path(sha256).unlink(missing_ok=True)
        return True

    def _make_room(self, sha256: str, size: int, required: bool) -> bool:
        """Delete least recently used entries no one holds until those left, the downloads in flight and ``size``
        fit the budget. When they cannot, delete nothing and return False; unless ``required``: then delete all
        that may go, and go over the budget by the entries in use."""
        evict = DirectoryLock(self.directory / LOCKS, "evict.lock")
        evict.acquire("shard cache", on_wait=lambda holder: log.debug("waiting for %s to make room", holder))
        try:
            entries = self._entries()
            total = size + self._in_flight(sha256, set(entries)) + sum(size for _, _, size in entries.values())
            total += 0 if required else size  # a prefetch leaves room for one read it did not foresee
            victims = []
            for sha, (path, _, entry_size) in sorted(entries.items(), key=lambda item: item[1][1]):
                if total <= self.budget:
                    break
                handle = lock_file(self._lock_path(sha), wait=False)
                if handle is not None:  # else in use here or in another process
                    victims.append((sha, path, handle))
                    total -= entry_size
            fits = total <= self.budget
            for sha, path, handle in victims:
                if fits or required:
                    remove_path(path)
                    self._lock_path(sha).unlink(missing_ok=True)
                unlock(handle)
            return fits or required
        finally:
            evict.release()

    def _in_flight(self, own: str, present: set[str]) -> int:
        """Bytes that other downloads in flight will add: each holds its entry's lock and wrote its size there.
        On the way, remove what killed downloads left behind: their temporaries, and the lock files of entries
        that are absent. Called under the evict lock, which every download takes before it starts."""
        reserved = 0
        for path in (self.directory / LOCKS).glob("*.lock"):
            sha = path.stem
            if sha == own or not _SHA256.fullmatch(sha):
                continue
            handle = lock_file(path, wait=False)
            if handle is None:
                reserved += 0 if sha in present else _reserved(path)
                continue
            for tmp in self.directory.glob(f".{sha}*{TMP_MARKER}*"):
                remove_path(tmp)
            if sha not in present:
                path.unlink(missing_ok=True)
            unlock(handle)
        return reserved

    def _run(self, stop: threading.Event) -> None:
        """Download the queue in order; one that does not fit beside the entries in use ends that queue."""
        while True:
            with self._wake:
                while not self._queue and not stop.is_set():
                    self._wake.wait()
                if stop.is_set():
                    return
                url, sha256, size = self._queue.pop(0)
                generation, self._busy = self._generation, True
            handle = None
            try:
                entry = self._entry(url, sha256)
                handle = self._acquire(url, sha256, size, entry, required=False) if size <= self.budget else None
                with self._mutex:
                    if handle is None and generation == self._generation:
                        self._queue.clear()
                    if handle is not None and sha256 in self._wanted and sha256 not in self._held:
                        self._held[sha256], handle = handle, None
            except Exception as exc:  # fetch() downloads it again and raises
                log.debug("prefetch of %s failed: %s", url, exc)
            finally:
                with self._wake:
                    self._busy = False
                    self._wake.notify_all()
            if handle is not None:
                unlock(handle)
