"""Everything about folders of shards: the cache format, its write protocol, its readers, and the file plumbing.

This package knows nothing about models or training: numpy arrays go in and numpy arrays (or torch tensors) come
out, so a cache can be read with ``storage`` alone, or with plain pyarrow, zarr or ``datasets``. The stages import
what ``__all__`` lists from here; the subpackages are ``io`` (atomic writes, locks, hashing, seals), ``codec``
(column layouts, no I/O), ``backends`` (Arrow, Zarr), ``write``, ``read`` and ``remote``. Names load on first use,
so ``import storage`` stays cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "storage.errors": ["BatchTooLargeError", "CacheError", "CacheNotFoundError", "ChecksumError", "DamagedRecordError",
                       "DirectoryInUseError", "FingerprintMismatchError", "ForeignDirectoryError", "ManifestError",
                       "NoSpaceError", "NotWritableError", "RemoteStorageError", "ShardSchemaError", "first_line"],
    "storage.manifest": ["FORMAT_VERSION", "MANIFEST_NAME", "Manifest", "ShardRecord", "fingerprint", "read_folder_manifest",
                         "read_manifest", "write_folder_manifest"],
    "storage.io.atomic": ["atomic_write", "ensure_writable", "is_disk_full", "no_space", "remove_path",
                          "remove_stale_temporaries", "write_json", "write_text"],
    "storage.io.hashing": ["names_sha256", "tree_sha256"],
    "storage.io.locks": ["DirectoryLock", "held", "lock_file", "unlock"],
    "storage.io.seals": ["read_sealed", "with_seal"],
    "storage.codec.layout": ["FORMAT_VERSIONS", "MAX_SAMPLES", "Layout"],
    "storage.codec.targets": ["ROLE_DOCUMENT_END", "ROLE_PADDING", "ROLE_TEXT"],
    "storage.backends": ["BACKENDS", "get_backend"],
    "storage.write.folder": ["CONFIG_NAME", "IDENTITY_NAME", "ShardFolder", "ShardPlan", "plan_shards"],
    "storage.write.cache": ["TOKENIZER_DIR", "TOKENS_DIR", "CacheDirectory"],
    "storage.write.background": ["BackgroundShardWriter"],
    "storage.write.parts": ["num_parts", "part_index", "shards_of_part"],
    "storage.read.stream": ["StreamOrder", "StreamState", "iterate_batches"],
    "storage.read.reader": ["ShardLoader", "SoftTargetStream", "read_shard", "sequential_batches", "to_tensors"],
    "storage.remote.fs": ["is_url", "open_fs", "upload_file"],
    "storage.remote.mirror": ["DEFAULT_LOCAL_BYTES", "Mirror", "join", "local_folder"],
    "storage.remote.store": ["Cache", "LocalShards", "RemoteShards", "ShardStore", "open_cache"],
    "storage.describe": ["format_summary", "read_cache", "summarize"],
    "storage.export": ["export_cache"],
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'storage' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
