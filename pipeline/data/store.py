"""The token store: the packed splits of one data config, tokenized once per cache directory and memory-mapped by every part.

``<cache dir or root>/tokens/<data fingerprint>/`` holds ``train.arrow``
(and ``eval.arrow``), written row by row as documents are packed, and
``index.json``, written last and atomically: row counts, documents read,
per-file sha256, the largest id and the content hash, sealed by
``index_sha256`` (``storage.io.seals``). The fingerprint hashes
the data config, the tokenizer and the size and mtime of local data files, so
it is known before anything is tokenized. A folder without a valid index (or
one whose seal fails), or whose files fail their sizes or sha256, is rebuilt. Parts that find no valid
store take an flock; the first builds it, the others wait and then read it.
"""
from __future__ import annotations

import hashlib
import json
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.data.arrow_rows import ArrowRowsWriter, CorruptRowsError, read_rows
from pipeline.data.config import DataConfig
from pipeline.data.generations import open_generation
from pipeline.data.load import local_files
from pipeline.data.pack import PackedSplit, content_sha256, pack_documents
from pipeline.data.sources import split_names
from pipeline.log import get_logger
from storage import (
    TOKENS_DIR,
    DirectoryLock,
    atomic_write,
    read_sealed,
    remove_path,
    tree_sha256,
    with_seal,
    write_json,
)

STORE_VERSION = 2  # 2: rows carry token_role
INDEX_NAME = "index.json"
INDEX_SEAL = "index_sha256"
log = get_logger("data")


@dataclass
class TokenStore:
    """An opened store: memory-mapped splits plus what its index records."""

    directory: Path
    splits: dict[str, PackedSplit]
    sha256: str
    max_id: int

    @property
    def documents(self) -> dict[str, int]:
        return {name: split.documents for name, split in self.splits.items()}


def _source_files(path: str | None) -> list | dict | None:
    """Name, size and mtime of each local data file, so edited data gets a new fingerprint (a generation folder: its
    identity, sealed manifest included); None for a hub id."""
    generation = open_generation(path)
    if generation is not None:
        return generation.identity
    if not path or not Path(path).expanduser().exists():
        return None
    _, files = local_files(Path(path).expanduser())
    return [[name, (stat := Path(name).stat()).st_size, stat.st_mtime_ns] for name in files]


def data_fingerprint(cfg: DataConfig, tokenizer_sha256: str) -> str:
    """What decides the packed rows: the data settings (not how they are read), the tokenizer and the source files."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("num_proc", "streaming")}
    identity = {"version": STORE_VERSION, "data": settings, "tokenizer_sha256": tokenizer_sha256,
                "files": _source_files(cfg.path), "eval_files": _source_files(cfg.eval_path)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def _read_index(path: Path, fingerprint: str) -> dict:
    """The index of the store being opened, or ``CorruptRowsError`` naming ``path``."""
    index = read_sealed(path, INDEX_SEAL, CorruptRowsError)
    if index.get("fingerprint") != fingerprint or index.get("version") != STORE_VERSION:
        raise CorruptRowsError(f"{path} belongs to another store")
    return index


def _open(folder: Path, fingerprint: str, seq_len: int) -> TokenStore:
    """The store in ``folder``, checked against its index; raises ``CorruptRowsError`` naming the problem."""
    index = _read_index(folder / INDEX_NAME, fingerprint)
    splits = {}
    for name, entry in index["splits"].items():
        path = folder / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["bytes"] or tree_sha256(path) != entry["sha256"]:
            raise CorruptRowsError(f"{path} is missing, truncated or does not match its sha256 in {INDEX_NAME}")
        ids, mask, roles = read_rows(path, seq_len)
        if len(ids) != entry["rows"]:
            raise CorruptRowsError(f"{path} has {len(ids)} rows, {INDEX_NAME} says {entry['rows']}")
        splits[name] = PackedSplit(ids, mask, entry["documents"], roles)
    return TokenStore(folder, splits, index["sha256"], index["max_id"])


def _build(folder: Path, fingerprint: str, cfg: DataConfig, tokenizer) -> None:
    """Tokenize and pack into ``folder``: each split file atomically, then the index."""
    remove_path(folder)
    folder.mkdir(parents=True)
    log.info(f"tokenizing {cfg.path} into the token store {folder}")
    with ExitStack() as stack:
        temporaries = {name: stack.enter_context(atomic_write(folder / f"{name}.arrow")) for name in split_names(cfg)}
        writers = {name: ArrowRowsWriter(tmp, cfg.seq_len) for name, tmp in temporaries.items()}
        try:
            packers = pack_documents(cfg, tokenizer, writers)
        finally:
            for writer in writers.values():
                writer.close()
    splits = {name: {"file": f"{name}.arrow", "rows": packer.rows, "documents": packer.documents,
                     "bytes": (folder / f"{name}.arrow").stat().st_size,
                     "sha256": tree_sha256(folder / f"{name}.arrow")} for name, packer in packers.items()}
    index = {"version": STORE_VERSION, "fingerprint": fingerprint, "seq_len": cfg.seq_len,
             "sha256": content_sha256(packers), "max_id": max(p.max_id for p in packers.values()), "splits": splits}
    write_json(folder / INDEX_NAME, with_seal(index, INDEX_SEAL))
    log.info(f"token store {folder}: " + ", ".join(f"{n} {s['rows']} rows from {s['documents']} documents"
                                                   for n, s in splits.items()))


def _try_open(folder: Path, fingerprint: str, seq_len: int, locked: bool) -> TokenStore | None:
    """The store, or None; only the lock holder says why, since without the lock another part may be writing it."""
    if not folder.exists():
        return None
    try:
        return _open(folder, fingerprint, seq_len)
    except CorruptRowsError as exc:
        if locked:
            log.warning(f"token store is incomplete or damaged: {exc}; rebuilding {folder}")
        return None


def token_store(root: Path, cfg: DataConfig, tokenizer, tokenizer_sha256: str) -> TokenStore:
    """Open the store of ``cfg`` under ``root/tokens``, building it first when no valid one exists."""
    fingerprint = data_fingerprint(cfg, tokenizer_sha256)
    folder = root / TOKENS_DIR / fingerprint
    store = _try_open(folder, fingerprint, cfg.seq_len, locked=False)
    if store is None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = DirectoryLock(folder.parent, f".{fingerprint}.lock")
        lock.acquire("token store", on_wait=lambda holder: log.info(
            f"waiting for {holder}, which holds {lock.path}, to finish the token store"))
        try:
            store = _try_open(folder, fingerprint, cfg.seq_len, locked=True)  # built by the part this one waited for
            if store is None:
                _build(folder, fingerprint, cfg, tokenizer)
                store = _open(folder, fingerprint, cfg.seq_len)
        finally:
            lock.release()
    else:
        log.info(f"token store {folder} is complete; reused without tokenizing")
    return store
