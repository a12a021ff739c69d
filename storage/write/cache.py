"""A cache directory: the folder-of-shards protocol (``storage.write.folder``) with soft-target shards, the
teacher's tokenizer, and a ``Manifest`` that lists every shard, written last."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from storage.io.atomic import atomic_write
from storage.manifest import Manifest, ShardRecord, read_manifest, write_manifest
from storage.write.folder import ShardFolder, ShardPlan

TOKENIZER_DIR = "tokenizer"
TOKENS_DIR = "tokens"
"""Where the token store of the packed data lives; it may precede the claim, so ``claim`` accepts it."""


class CacheDirectory(ShardFolder):
    """One cache directory (or URL, through its local working copy) of one fingerprint."""

    key = "cache.dir"
    what = "a Distillery cache"
    allowed = (TOKENS_DIR,)
    extra_names = (TOKENIZER_DIR,)
    elsewhere = "use another cache.dir, or cache.root to keep caches side by side"

    def manifest_fingerprint(self) -> str:
        return read_manifest(self.path).fingerprint  # the full check of a cache's manifest, not only its seal

    def write_shard(self, plan: ShardPlan, backend, columns: dict[str, np.ndarray], level: int) -> None:
        """Write one shard's stored columns (``storage.codec.layout``) atomically, then its done record."""
        self.mark_done(plan, self.encode_shard(plan, backend, columns, level))

    def encode_shard(self, plan: ShardPlan, backend, columns: dict[str, np.ndarray], level: int) -> ShardRecord:
        """Compress and write one shard's stored columns atomically, and hash it; the shard is not done yet."""
        backend.write(self.path / plan.name, columns, level)
        return self.record(plan, int(columns["input_ids"].size))

    def assemble(self, plans: list[ShardPlan], header: Manifest, save_tokenizer: Callable[[Path], None]) -> Path | None:
        """Copy the tokenizer (``save_tokenizer(folder)``), then write ``manifest.json`` last: ``header`` completed
        with every shard and the totals per split. Only the first of parts that finish together writes it; the
        others get None."""

        def write(shards: list[ShardRecord]) -> Path:
            with atomic_write(self.path / TOKENIZER_DIR) as tmp:
                save_tokenizer(tmp)
            self.mirror.push(TOKENIZER_DIR)
            splits: dict[str, dict] = {}
            for shard in shards:
                totals = splits.setdefault(shard.split, {"shards": 0, "sequences": 0, "tokens": 0, "bytes": 0})
                totals["shards"] += 1
                for key in ("sequences", "tokens", "bytes"):
                    totals[key] += getattr(shard, key)
            manifest = replace(header, fingerprint=self.fingerprint, tokenizer_dir=TOKENIZER_DIR, splits=splits,
                               shards=shards)
            return write_manifest(self.path, manifest)

        return self.finish(plans, write)
