"""The shard backends, Arrow IPC and Zarr v3, by the name a manifest records as its ``format``.

Each has ``name``, ``suffix``, ``write(path, columns, level)`` and ``read(path)``; one conformance suite
(``tests/test_storage.py``) covers both.
"""
from __future__ import annotations

from storage.backends.arrow import ArrowBackend
from storage.backends.zarr import ZarrBackend

BACKENDS = {f.name: f for f in (ArrowBackend(), ZarrBackend())}


def get_backend(name: str):
    """Return the backend called ``name`` ('arrow' or 'zarr')."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown shard format {name!r}; choose one of {sorted(BACKENDS)}") from None
