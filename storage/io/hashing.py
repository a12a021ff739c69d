"""The one place that hashes files: the sha256 of a file or of a folder of files, on the local disk or behind a URL.

A file's digest is that of its bytes (what ``sha256sum`` prints). A folder's runs over its files in path order,
each contributing ``relative/path`` + NUL + its bytes; ``names_sha256`` does the same over chosen files in a
chosen order (a model folder's weights). Remote objects are read through their fsspec file system, so a local
folder and its uploaded copy hash the same.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

BLOCK = 8 << 20
"""Bytes read at a time: large enough that remote reads are few, small enough to keep memory flat."""
LOCAL = LocalFileSystem()


def _update(digest, fs, path: str) -> None:
    with fs.open(path, "rb", block_size=BLOCK) as handle:  # plain reads: no mapped pages left in this process
        while block := handle.read(BLOCK):
            digest.update(block)


def _listing(path: str, fs) -> list[tuple[str, int]]:
    """``(relative path, size)`` of every file under the folder ``path``, in path order (as ``Path`` sorts)."""
    found = fs.find(path, detail=True)
    files = [(name[len(path):].lstrip("/"), info["size"]) for name, info in found.items() if info["type"] == "file"]
    return sorted(files, key=lambda item: item[0].split("/"))


def listing(path: str | os.PathLike, fs=None) -> list[tuple[str, int]]:
    """``(relative path, size)`` of a folder's files; ``[("", size)]`` for a file."""
    fs, path = fs or LOCAL, _name(path, fs)
    if not fs.isdir(path):
        return [("", fs.info(path)["size"])]
    return _listing(path, fs)


def tree_bytes(path: str | os.PathLike, fs=None) -> int:
    """Bytes of a file, or of a folder's files."""
    return sum(size for _, size in listing(path, fs))


def tree_sha256(path: str | os.PathLike, fs=None) -> str:
    """sha256 of a file's bytes, or of a folder's files in path order (see the module docstring)."""
    files = listing(path, fs)
    if files and files[0][0] == "":
        return names_sha256(path, [None], fs)
    return names_sha256(path, [name for name, _ in files], fs)


def names_sha256(folder: str | os.PathLike, names: list[str | None], fs=None) -> str:
    """sha256 over the files ``names`` of ``folder``, in that order, each as name + NUL + bytes; the name ``None``
    stands for ``folder`` itself, a file, hashed as its bare bytes."""
    fs, root = fs or LOCAL, _name(folder, fs)
    digest = hashlib.sha256()
    for name in names:
        if name is not None:
            digest.update(name.encode() + b"\0")
        _update(digest, fs, root if name is None else f"{root}/{name}")
    return digest.hexdigest()


def _name(path: str | os.PathLike, fs) -> str:
    """The path as the file system names it: absolute and with forward slashes on the local disk."""
    return str(path).rstrip("/") if fs is not None else Path(path).absolute().as_posix()
