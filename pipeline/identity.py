"""Content hashes that identify a teacher and a tokenizer inside a cache fingerprint."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def weights_sha256(model_dir: Path) -> str | None:
    """sha256 over ``config.json`` and the weight files of a local model folder, in sorted order."""
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in model_dir.glob(pattern)})
    if not files:
        return None
    digest = hashlib.sha256()
    for path in [model_dir / "config.json", *files]:
        if not path.is_file():
            continue
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def teacher_identity(name: str, revision: str | None, config) -> dict:
    """Teacher name, resolved revision and, for local folders, the weight-file hash."""
    local = Path(name).expanduser()
    if local.is_dir():
        return {"name": name, "revision": None, "weights_sha256": weights_sha256(local)}
    return {"name": name, "revision": getattr(config, "_commit_hash", None) or revision, "weights_sha256": None}


def tokenizer_sha256(tokenizer) -> str:
    """Hash of the token-to-id mapping and special tokens: what decides the ids a model sees."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = {"eos": tokenizer.eos_token, "bos": tokenizer.bos_token, "pad": tokenizer.pad_token}
    text = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()
