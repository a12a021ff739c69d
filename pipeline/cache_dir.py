"""The cache directory's life cycle: claim it, check its identity, assemble its manifest."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from pipeline.errors import OutputError
from pipeline.shard_writer import ShardPlan, read_done_record
from storage.atomic import atomic_write, write_text
from storage.errors import FingerprintMismatchError
from storage.manifest import MANIFEST_NAME, done_record_path, read_manifest, write_json

IDENTITY_NAME = "fingerprint.json"
CONFIG_NAME = "config.yaml"
TOKENIZER_DIR = "tokenizer"


def ensure_writable(directory: Path, key: str) -> None:
    """Create ``directory`` and prove a file can be written there, or raise ``OutputError``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{key} {directory} is not a writable directory ({exc.strerror or exc}); choose another") from exc


def is_complete(directory: Path, fingerprint: str) -> bool:
    """True for a finished cache of this fingerprint; raises if it holds another cache."""
    if (directory / MANIFEST_NAME).is_file():
        found = read_manifest(directory).data.get("fingerprint")
        if found != fingerprint:
            raise FingerprintMismatchError(
                f"{directory} already holds a cache with fingerprint {found}, but these settings give {fingerprint}; "
                "use another cache.dir, or cache.root to keep caches side by side"
            )
        return True
    return False


def claim(directory: Path, fingerprint: str, config_yaml: str) -> None:
    """Mark ``directory`` as the cache of ``fingerprint`` before any shard is written.

    Refuses a directory that holds another cache's shards, or unrelated files.
    """
    identity = directory / IDENTITY_NAME
    # fingerprint.json is always written first, so a listing that shows other files shows it too.
    entries = [p.name for p in directory.iterdir() if not p.name.startswith(".")]
    if IDENTITY_NAME in entries:
        found = json.loads(identity.read_text(encoding="utf-8")).get("fingerprint")
        if found != fingerprint:
            raise FingerprintMismatchError(
                f"{directory} holds a partial cache with fingerprint {found}, but these settings give {fingerprint}; "
                "use another cache.dir, or delete that directory to discard it"
            )
    elif entries:
        raise OutputError(f"cache.dir {directory} is not empty and is not a Distillery cache; choose an empty directory")
    write_json(identity, {"fingerprint": fingerprint})
    write_text(directory / CONFIG_NAME, config_yaml)


def missing_shards(directory: Path, plans: list[ShardPlan]) -> list[str]:
    return [p.name for p in plans if not done_record_path(directory / p.name).is_file()]


def assemble_manifest(directory: Path, plans: list[ShardPlan], header: dict, tokenizer) -> Path:
    """Write the tokenizer copy, then ``manifest.json`` (last: it marks completion)."""
    shards = []
    for plan in plans:
        record = read_done_record(directory, plan, header["fingerprint"])
        if record is None:
            raise FileNotFoundError(f"shard {directory / plan.name} is missing or corrupt; rerun `distillery cache` to rebuild it")
        shards.append({k: record[k] for k in ("path", "split", "sequences", "tokens", "bytes", "sha256")})
    with atomic_write(directory / TOKENIZER_DIR) as tmp:
        tokenizer.save_pretrained(str(tmp))
    splits = {}
    for shard in shards:
        totals = splits.setdefault(shard["split"], {"shards": 0, "sequences": 0, "tokens": 0, "bytes": 0})
        totals["shards"] += 1
        for key in ("sequences", "tokens", "bytes"):
            totals[key] += shard[key]
    manifest = {**header, "tokenizer_dir": TOKENIZER_DIR, "splits": splits, "shards": shards}
    write_json(directory / MANIFEST_NAME, manifest)
    return directory / MANIFEST_NAME
