"""The one helper through which every file and directory of a cache, checkpoint or run is written."""
from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from storage.errors import NoSpaceError, NotWritableError

TMP_MARKER = ".tmp-"
OLD_MARKER = ".old-"
_RACE_ATTEMPTS = 50
_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an error it was raised from, says the disk or quota is full. Libraries that wrap
    their writers' errors (DCP, pyarrow) keep only the message."""
    while exc is not None:
        if isinstance(exc, NoSpaceError) or isinstance(exc, OSError) and exc.errno in _FULL \
                or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def no_space(path: Path) -> NoSpaceError:
    return NoSpaceError(f"no space left on the device of {path}: free space there (or choose another "
                        "directory) and rerun; what was complete is kept")


def temp_name(path: Path, marker: str = TMP_MARKER) -> Path:
    """A unique hidden sibling of ``path``; readers never look at such names."""
    return path.with_name(f".{path.name}{marker}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_path(path: Path) -> None:
    """Remove a file or a directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _replace_directory(tmp: Path, final: Path) -> None:
    """Move the complete directory ``tmp`` onto ``final``, which may exist.

    POSIX cannot rename onto a non-empty directory, so the old one is first
    renamed aside and removed only once the new one is in place: a crash in
    between leaves the old copy under a hidden name, never neither copy. When
    another writer puts its own copy in place between those two renames (two
    parts finishing together), the rename fails with ENOTEMPTY and is retried.
    """
    for _ in range(_RACE_ATTEMPTS):
        aside = temp_name(final, OLD_MARKER)
        try:
            os.rename(final, aside)
        except FileNotFoundError:
            aside = None  # nothing there, or another writer moved it first
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                if aside is not None:
                    os.rename(aside, final)  # put the old copy back
                raise
            continue  # another writer's copy landed in between; move it aside too
        finally:
            if aside is not None and aside.exists():
                remove_path(aside)
        return
    raise OSError(errno.EBUSY, f"could not replace {final}: other writers kept replacing it")


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write a file or a directory at; on success move it onto ``path``.

    Readers never see a partial write. A file replaces its old version in one
    ``os.replace``, so readers see the old file or the new one. A directory
    goes through ``_replace_directory``: readers see the old copy, the new one,
    or, for the instant between two renames, no directory at all. On error the
    temporary is removed and ``path`` is left as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        yield tmp
        if tmp.is_dir():
            _replace_directory(tmp, final)
        else:
            os.replace(tmp, final)
    except BaseException as exc:
        remove_path(tmp)
        if is_disk_full(exc) and not isinstance(exc, NoSpaceError):
            raise no_space(final) from exc
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write a text file, flushed to disk before the rename."""
    with atomic_write(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Atomically write ``data`` as indented JSON."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def stale_temporaries(directory: Path, name: str) -> list[Path]:
    """Leftover temporaries and set-aside old copies of ``name`` in ``directory`` from killed writers."""
    return sorted([*directory.glob(f".{name}{TMP_MARKER}*"), *directory.glob(f".{name}{OLD_MARKER}*")])


def remove_stale_temporaries(directory: Path, names: tuple[str, ...] | None = None) -> None:
    """Remove the temporaries and set-aside copies that killed writers left in ``directory`` (of ``names`` only,
    when given). Call it holding the lock that every writer of those names holds, so none is a live write."""
    if not directory.is_dir():
        return
    for path in directory.glob(".*"):
        owner = path.name[1:].split(TMP_MARKER)[0].split(OLD_MARKER)[0]
        if owner != path.name[1:] and (names is None or owner in names):
            remove_path(path)


def ensure_writable(directory: Path, key: str) -> None:
    """Create ``directory`` and prove a file can be written there, or raise ``NotWritableError`` naming ``key``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise NotWritableError(
            f"{key} {directory} is not a writable directory ({exc.strerror or exc}); choose another") from exc
