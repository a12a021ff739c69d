"""An exclusive ``flock`` on a file in an output directory, so two jobs never write into one directory at once.

The kernel drops the lock when its holder exits, however it exits (``kill -9``
included), so a lock is never stale; but a process that lives on, such as a
torchrun worker orphaned by a killed launcher, keeps it until it ends.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from storage.errors import DirectoryInUseError


class DirectoryLock:
    """Hold ``<directory>/<name>`` exclusively from ``acquire`` until ``release`` or the process's end."""

    def __init__(self, directory: Path, name: str = ".lock"):
        self.path = Path(directory) / name
        self._handle = None

    def acquire(self, what: str, on_wait: Callable[[str], None] | None = None) -> None:
        """Take the lock. When another process holds it, raise ``DirectoryInUseError`` naming the holder (``what``
        names the directory's key), or, given ``on_wait``, call it with the holder and wait for the lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            if on_wait is not None:
                on_wait(holder)
                fcntl.flock(handle, fcntl.LOCK_EX)
            else:
                handle.close()
                raise DirectoryInUseError(
                    f"{what} {self.path.parent} is in use by {holder}; wait for that job to end or stop it "
                    "(a torchrun worker left running by a killed launcher holds it until it exits)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def lock_file(path: Path, *, shared: bool = False, wait: bool = True):
    """An open handle holding an ``flock`` on ``path`` (exclusive, or ``shared``); without ``wait``, None when
    another holder's lock stands in the way.

    A lock file is deleted only by a holder of its exclusive lock, so a lock won on a file that is no longer at
    ``path`` guards nothing: it is dropped and taken again on the file that is there now."""
    mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
    while True:
        handle = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, mode)
        except BlockingIOError:
            handle.close()
            return None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                return handle
        handle.close()


@contextlib.contextmanager
def held(path: Path):
    """Hold an exclusive ``flock`` on ``path`` for the ``with`` block, waiting for it."""
    handle = lock_file(path)
    try:
        yield
    finally:
        unlock(handle)


def unlock(handle) -> None:
    """Unlock, then close: closing alone would leave the lock held while a forked child has the descriptor."""
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()
