"""The one helper through which every file and shard directory is written."""
from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_MARKER = ".tmp-"


def temp_name(path: Path) -> Path:
    """A unique hidden sibling of ``path``; readers never look at such names."""
    return path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_path(path: Path) -> None:
    """Remove a file or a directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success rename it onto ``path``.

    The caller writes a file or a directory at the yielded path. Readers see
    either the old ``path`` or the complete new one, never a partial write.
    On error the temporary is removed and ``path`` is left untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        yield tmp
        if tmp.is_dir() and final.exists():
            # os.replace cannot replace a non-empty directory.
            remove_path(final)
        os.replace(tmp, final)
    except BaseException:
        remove_path(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write a text file, flushed to disk before the rename."""
    with atomic_write(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


def stale_temporaries(directory: Path, name: str) -> list[Path]:
    """Leftover temporaries of ``name`` in ``directory`` from killed writers."""
    return sorted(directory.glob(f".{name}{TMP_MARKER}*"))
