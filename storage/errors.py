"""Error classes of the storage layer; each subclasses the built-in error a caller would expect."""


class CacheError(Exception):
    """Base class for every storage error."""


class CacheNotFoundError(CacheError, FileNotFoundError):
    """A cache directory, manifest or shard is missing."""


class BatchTooLargeError(CacheError, ValueError):
    """A global batch asks for more sequences than a split holds."""


class ChecksumError(CacheError, ValueError):
    """A shard's bytes do not match the sha256 recorded for it."""


class DirectoryInUseError(CacheError, BlockingIOError):
    """Another live process holds an output directory's lock."""


class FingerprintMismatchError(CacheError, ValueError):
    """A directory already holds a cache built with different settings."""


class ForeignDirectoryError(CacheError, ValueError):
    """A directory to write a cache into holds files that are not a Distillery cache."""


class ManifestError(CacheError, ValueError):
    """A manifest or done record is not valid JSON of the expected shape."""


class DamagedRecordError(ManifestError):
    """A shard's done record is torn, edited, or disagrees with its shard or plan; it is never trusted."""


class NotWritableError(CacheError, OSError):
    """An output directory cannot be created or written."""


class ShardSchemaError(CacheError, ValueError):
    """Arrays handed to a shard writer have the wrong names, shapes or dtypes."""


class NoSpaceError(CacheError, OSError):
    """The disk (or quota) of an output directory is full."""


class RemoteStorageError(CacheError, OSError):
    """An object store refused or failed a request after its retries; the message names the URL."""


class ExportError(CacheError, ValueError):
    """An export was asked for a split, slice or output directory that cannot be used; the message says why."""


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its class name when it has none), for one-line reports."""
    return (str(exc).splitlines() or [type(exc).__name__])[0]
