"""Error classes. Each subclasses the built-in error a caller would expect."""


class CacheError(Exception):
    """Base class for every storage error."""


class CacheNotFoundError(CacheError, FileNotFoundError):
    """A cache directory, manifest or shard is missing."""


class ChecksumError(CacheError, ValueError):
    """A shard's bytes do not match the sha256 recorded for it."""


class FingerprintMismatchError(CacheError, ValueError):
    """A directory already holds a cache built with different settings."""


class ShardSchemaError(CacheError, ValueError):
    """Arrays handed to a shard writer have the wrong names, shapes or dtypes."""
