"""Registry of shard backends. Each exposes ``name``, ``suffix``, ``write`` and ``read``."""
from __future__ import annotations

from storage.arrow_shards import ArrowFormat
from storage.zarr_shards import ZarrFormat

FORMATS = {f.name: f for f in (ArrowFormat(), ZarrFormat())}


def get_format(name: str):
    """Return the backend called ``name`` ('arrow' or 'zarr')."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown shard format {name!r}; choose one of {sorted(FORMATS)}") from None
