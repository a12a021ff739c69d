"""The typed ``Manifest`` and ``ShardRecord``: pure data, and the only reader and writer of ``manifest.json``.

The manifest is written last and atomically; its existence is the only marker of a complete cache. Field order
in ``Manifest`` is the key order of the JSON file, followed by ``manifest_sha256``, its seal
(``storage.io.seals``). Where the shards are, and how they are fetched and checked, is ``storage.remote.store``'s
concern: this module reads, validates and writes JSON.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from storage.errors import CacheNotFoundError, ManifestError
from storage.io.atomic import write_json
from storage.io.seals import read_sealed, seal_is_broken, with_seal

FORMAT_VERSION = 3  # 3: one schema per cache, counts, sorted delta-coded ids (storage.codec.v3)
MANIFEST_NAME = "manifest.json"
MANIFEST_SEAL = "manifest_sha256"


def fingerprint(identity: dict) -> str:
    """A short stable hash of a JSON-serialisable identity dictionary."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _relative_inside(path) -> bool:
    """A relative path with no ``..``: it names something inside the directory it is relative to."""
    parts = PurePosixPath(path).parts if isinstance(path, str) else ("..",)
    return bool(parts) and not PurePosixPath(path).is_absolute() and ".." not in parts


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

    Descriptive
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
    text_alignment: int | None = None
    """1: shards hold ``token_role`` (``storage.codec.targets``), so each sequence's exact text can be spelled with
    the cache's tokenizer and students of other tokenizers aligned to it by bytes; None: a cache made before
    this addition, or with ``cache.text_alignment=false`` (same-tokenizer students only)."""
    fingerprint_identity: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    tokenizer_dir: str | None = None
    splits: dict = field(default_factory=dict)
    shards: list[ShardRecord] = field(default_factory=list)
    location: str = field(default=".", compare=False)
    """Where the manifest was read from, as the user named it (a directory or a URL), for messages; not stored."""

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

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "location"}
        data["shards"] = [dataclasses.asdict(s) for s in self.shards]
        return data

    @classmethod
    def from_json(cls, data: dict, location: str, source: str = MANIFEST_NAME) -> Manifest:
        """Build from parsed JSON, naming ``source`` and the bad key in any error."""
        names = {f.name for f in dataclasses.fields(cls)} - {"location"}
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
        return cls(**known, shards=shards, location=location)


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
    return Manifest.from_json(data, name or str(directory), label)


def write_folder_manifest(directory: Path, record: dict, shards: list[ShardRecord]) -> Path:
    """Write the ``manifest.json`` of a folder of shards that is not a cache (a generation folder, say): ``record``
    with every shard, sealed, atomically, last."""
    path = directory / MANIFEST_NAME
    write_json(path, with_seal({**record, "shards": [dataclasses.asdict(s) for s in shards]}, MANIFEST_SEAL))
    return path


def read_folder_manifest(directory: str | Path, name: str | None = None) -> tuple[dict, list[ShardRecord]]:
    """The sealed record and the shards of a finished folder's manifest, checked as a cache's is."""
    path = Path(directory) / MANIFEST_NAME
    label = f"{name}/{MANIFEST_NAME}" if name else str(path)
    if not path.is_file():
        raise CacheNotFoundError(f"no {MANIFEST_NAME} in {name or directory}: the folder is not complete")
    record = read_sealed(path, MANIFEST_SEAL, ManifestError)
    try:
        shards = [ShardRecord(**s) for s in record["shards"]]
    except (KeyError, TypeError) as exc:
        raise ManifestError(f"{label}: its list of shards is malformed ({exc}); write the folder again") from None
    escaping = [s.path for s in shards if not _relative_inside(s.path)]
    if escaping:
        raise ManifestError(f"{label}: path {escaping[0]!r} is not inside the folder; the manifest is tampered or "
                            "damaged: write the folder again")
    return record, shards
