"""Everything about a cache directory: shard formats, the typed manifest, the write protocol and the readers.

This package knows nothing about models or training: numpy arrays go in and
numpy arrays (or torch tensors) come out, so a cache can be read with
``storage`` alone, or with plain pyarrow or zarr.
"""
from storage.atomic import atomic_write
from storage.errors import (
    CacheError,
    CacheNotFoundError,
    ChecksumError,
    FingerprintMismatchError,
)
from storage.formats import FORMATS, get_format
from storage.manifest import Manifest, ShardRecord, read_manifest

__all__ = [
    "FORMATS",
    "CacheError",
    "CacheNotFoundError",
    "ChecksumError",
    "FingerprintMismatchError",
    "Manifest",
    "ShardRecord",
    "atomic_write",
    "get_format",
    "read_manifest",
]
