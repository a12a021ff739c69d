"""Helpers shared by the tests."""
from __future__ import annotations

from pathlib import Path

from pipeline.cache import CacheResult, run_cache
from pipeline.config import CacheJob
from pipeline.config_loading import load_config
from storage.formats import get_format
from storage.manifest import read_manifest


def cache(args: list[str], **kwargs) -> CacheResult:
    return run_cache(load_config(CacheJob, None, args), **kwargs)


def read_all(directory: Path) -> dict[str, dict]:
    """Every shard of a finished cache, by shard path."""
    manifest = read_manifest(directory)
    fmt = get_format(manifest.data["format"])
    return {s["path"]: fmt.read(manifest.shard_path(s)) for s in manifest.shards}


def cache_args(model: Path, data: Path, directory: Path, **extra) -> list[str]:
    """``key=value`` overrides for a small, fast cache run."""
    settings = {
        "teacher.model": model, "data.path": data, "data.seq_len": 64, "data.holdout_fraction": 0.1,
        "cache.dir": directory, "cache.shard_size": 8, "cache.batch_size": 4, "cache.chunk_size": 100,
        "cache.mode": "topk", "cache.top_k": 8, "device": "cpu",
    }
    settings.update(extra)
    return [f"{k}={v}" for k, v in settings.items()]
