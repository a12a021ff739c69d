"""Sealed JSON records: a record that carries the sha256 of its own content, so edits that leave valid JSON show.

A seal catches damage that no parser notices (a changed count, a removed entry). It is computed over the
canonical JSON of every other field: keys sorted, no whitespace, after one round trip through JSON, so the text
the record was written as does not matter. Manifests, done records, token-store indexes and checkpoint states
are sealed.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from storage.errors import first_line


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
        raise error(f"{path} is missing or not valid JSON ({first_line(exc)})") from None
    if not isinstance(record, dict) or seal_is_broken(record, key):
        raise error(f"{path} does not match its {key}: it was edited or damaged")
    return record
