"""Shard formats, manifest and checksums for cached teacher soft targets.

This package knows nothing about models or training: numpy arrays go in and
numpy arrays come out, so a cache can be read with ``storage`` alone.
"""
from storage.atomic import atomic_write
from storage.errors import (
    CacheError,
    CacheNotFoundError,
    ChecksumError,
    FingerprintMismatchError,
)
from storage.formats import FORMATS, get_format
from storage.manifest import Manifest, read_manifest

__all__ = [
    "FORMATS",
    "CacheError",
    "CacheNotFoundError",
    "ChecksumError",
    "FingerprintMismatchError",
    "Manifest",
    "atomic_write",
    "get_format",
    "read_manifest",
]
