"""The typed ``Manifest`` and ``ShardRecord``, fingerprints, and the checksums of files, shards and sealed records.

This module is the only reader and writer of ``manifest.json``. The manifest
is written last and atomically; its existence is the only marker of a
complete cache. Field order in ``Manifest`` is the key order of the JSON file,
followed by ``manifest_sha256``, its seal (``with_seal``).

A seal is a sha256 a JSON record carries of its own content. It catches edits
and damage that leave the record valid JSON (a changed count, a removed
entry), which no parser notices. It is computed over the canonical JSON of
every other field: keys sorted, no whitespace, after one round trip through
JSON, so the text the record was written as does not matter. Manifests, done
records, token-store indexes and checkpoint states are sealed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from storage.atomic import write_json
from storage.errors import CacheNotFoundError, ChecksumError, ManifestError

FORMAT_VERSION = 3  # 3: one schema per cache, counts, sorted delta-coded ids (storage.layout_v3)
MANIFEST_NAME = "manifest.json"
MANIFEST_SEAL = "manifest_sha256"
_BLOCK = 1 << 22


def fingerprint(identity: dict) -> str:
    """A short stable hash of a JSON-serialisable identity dictionary."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:  # plain reads: hashing leaves no mapped pages in this process
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _content_sha256(record: dict) -> str:
    canonical = json.dumps(json.loads(json.dumps(record)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def with_seal(record: dict, key: str) -> dict:
    """``record`` with ``key`` added last: the sha256 of every other field."""
    return {**record, key: _content_sha256(record)}


def seal_is_broken(record: dict, key: str) -> bool:
    """True when ``record`` carries a seal under ``key`` that does not match the rest of it.

    A record without one (written before seals existed) is not broken.
    """
    if key not in record:
        return False
    return record[key] != _content_sha256({k: v for k, v in record.items() if k != key})


def read_sealed(path: Path, key: str, error: type[Exception]) -> dict:
    """The JSON object in ``path`` after checking its seal under ``key``; else ``error`` naming the file."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise error(f"{path} is missing or not valid JSON ({_first_line(exc)})") from None
    if not isinstance(record, dict) or seal_is_broken(record, key):
        raise error(f"{path} does not match its {key}: it was edited or damaged")
    return record


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _update_with_file(digest, path: Path) -> None:
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)


def _relative_inside(path) -> bool:
    """A relative path with no ``..``: it names something inside the directory it is relative to."""
    parts = PurePosixPath(path).parts if isinstance(path, str) else ("..",)
    return bool(parts) and not PurePosixPath(path).is_absolute() and ".." not in parts


def shard_sha256(path: Path) -> str:
    """sha256 of a shard file, or of a shard directory's files.

    For a directory the digest runs over its files in sorted relative-path
    order, each contributing ``relative/path`` + ``NUL`` + its bytes.
    """
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
            _update_with_file(digest, file)
        return digest.hexdigest()
    return file_sha256(path)


def shard_bytes(path: Path) -> int:
    """Size on disk of a shard file or of a shard directory's files."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


@dataclass(frozen=True)
class ShardRecord:
    """One shard listed in the manifest; ``path`` is relative to the cache directory."""

    path: str
    split: str
    sequences: int
    tokens: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """A complete cache: what was cached, how, and every shard with its checksum.

    ``directory`` is where it was read from and is not stored. Descriptive
    sections (``teacher``, ``dataset``, ``config`` ...) are plain mappings
    written by stage 1; storage itself needs only ``format`` and ``shards``.
    """

    format_version: int = FORMAT_VERSION
    fingerprint: str = ""
    created_by: str = ""
    teacher: dict = field(default_factory=dict)
    tokenizer: dict = field(default_factory=dict)
    vocab_size: int | None = None
    dataset: dict = field(default_factory=dict)
    seq_len: int | None = None
    mode: str = "topk"
    top_k: int | None = None
    samples: int | None = None
    seed: int | None = None
    width: int | None = None
    temperature: float = 1.0
    format: str = "arrow"
    compression: dict = field(default_factory=dict)
    dtypes: dict = field(default_factory=dict)
    id_storage: str | None = None
    pad_id: int | None = None
    """Format 3: the id that unused slots decode to in a plain reader (the largest value of the id dtype)."""
    logprob_bits: int | None = None
    """Format 3: 16 or 8 bits per stored head log-prob."""
    fingerprint_identity: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    tokenizer_dir: str | None = None
    splits: dict = field(default_factory=dict)
    shards: list[ShardRecord] = field(default_factory=list)
    directory: Path = field(default=Path("."), compare=False)
    remote: object = field(default=None, compare=False, repr=False)
    """For a cache at a URL, its ``storage.remote_shards.RemoteShards``: shards then come from there."""

    @property
    def location(self) -> str:
        """Where the cache is, as the user named it: a directory or a URL."""
        return self.remote.url if self.remote else str(self.directory)

    def folder(self, relative: str) -> Path:
        """A local path to a folder of the cache (its tokenizer)."""
        return self.remote.folder(relative) if self.remote else self.directory / relative

    @property
    def tokenizer_length(self) -> int:
        """Real tokens of the tokenizer; output rows at or beyond it are padding."""
        return self.tokenizer.get("length", self.vocab_size)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def shards_for(self, split: str) -> list[ShardRecord]:
        return [s for s in self.shards if s.split == split]

    def shard_path(self, record: ShardRecord) -> Path:
        """The shard's local path (for a remote cache, of a copy verified when downloaded), refused when it (or
        a symlink on the way) leads out of the cache directory."""
        if self.remote:
            return self.remote.fetch(record)
        path = self.directory / record.path
        if not path.resolve().is_relative_to(self.directory.resolve()):
            raise ManifestError(f"shard {record.path!r} in {self.directory / MANIFEST_NAME} leads outside the cache "
                                "directory (a symlink); the cache is tampered or damaged: rebuild it")
        return path

    def verify(self, records: list[ShardRecord] | None = None) -> list[str]:
        """Re-hash ``records`` (default: every listed shard); return one message per bad or missing shard."""
        problems = []
        for record in self.shards if records is None else records:
            if self.remote:
                problems += [p for p in [self.remote.problem(record)] if p]
                continue
            path = self.shard_path(record)
            if not path.exists():
                problems.append(f"missing: {path}")
            elif shard_sha256(path) != record.sha256:
                problems.append(f"checksum mismatch: {path}")
        return problems

    def check_shard(self, record: ShardRecord) -> Path:
        """Return the shard's path after verifying its checksum."""
        if self.remote:
            return self.remote.fetch_checked(record)
        path = self.shard_path(record)
        if not path.exists():
            raise CacheNotFoundError(f"shard {path} listed in {self.directory / MANIFEST_NAME} is missing")
        if shard_sha256(path) != record.sha256:
            raise ChecksumError(
                f"shard {path} does not match its sha256 in the manifest; "
                f"the cache is corrupt: run `distillery verify {self.location}` and rebuild it"
            )
        return path

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("directory", "remote")}
        data["shards"] = [dataclasses.asdict(s) for s in self.shards]
        return data

    @classmethod
    def from_json(cls, data: dict, directory: Path, source: str = MANIFEST_NAME) -> Manifest:
        """Build from parsed JSON, naming ``source`` and the bad key in any error."""
        names = {f.name for f in dataclasses.fields(cls)} - {"directory", "remote"}
        if not isinstance(data, dict) or not isinstance(data.get("shards"), list):
            raise ManifestError(f"{source} is not a Distillery manifest (no list of shards); rebuild the cache")
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise ManifestError(f"{source} has format_version {data['format_version']}, newer than this "
                                f"Distillery reads ({FORMAT_VERSION}); upgrade Distillery")
        try:
            shards = [ShardRecord(**record) for record in data["shards"]]
        except TypeError as exc:
            raise ManifestError(f"{source}: a shard record is malformed ({exc}); rebuild the cache") from None
        known = {k: v for k, v in data.items() if k in names and k != "shards"}
        listed = [*(r.path for r in shards), known.get("tokenizer_dir")]
        escaping = [p for p in listed if p is not None and not _relative_inside(p)]
        if escaping:
            raise ManifestError(f"{source}: path {escaping[0]!r} is not inside the cache directory; the manifest is "
                                "tampered or damaged: rebuild the cache")
        return cls(**known, shards=shards, directory=directory)


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically: the last step of a cache, marking it complete."""
    path = directory / MANIFEST_NAME
    write_json(path, with_seal(manifest.to_json(), MANIFEST_SEAL))
    return path


def read_manifest(directory: str | Path, name: str | None = None) -> Manifest:
    """Load the manifest of a complete cache, or raise ``CacheNotFoundError`` / ``ManifestError``; messages
    call the cache ``name`` (default: ``directory``), so that a local copy of a remote one names its URL."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    label = f"{name}/{MANIFEST_NAME}" if name else str(path)
    if not path.is_file():
        raise CacheNotFoundError(
            f"no {MANIFEST_NAME} in {name or directory}: it is not a complete Distillery cache "
            f"(run or finish `distillery cache` for it first)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{label} is not valid JSON ({exc}); the cache is damaged: rebuild it") from None
    if isinstance(data, dict) and seal_is_broken(data, MANIFEST_SEAL):
        raise ManifestError(f"{label} does not match its {MANIFEST_SEAL}: it was edited or damaged after it was "
                            "written; the cache cannot be trusted: rebuild it")
    return Manifest.from_json(data, directory, label)
