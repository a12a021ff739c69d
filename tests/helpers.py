"""Helpers shared by the tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cache.config import CacheJob
from pipeline.cache.run import CacheResult, run_cache
from pipeline.config_loading import load_config
from storage.formats import get_format
from storage.manifest import read_manifest


def cache(args: list[str], **kwargs) -> CacheResult:
    return run_cache(load_config(CacheJob, None, args), **kwargs)


def read_all(directory: Path) -> dict[str, dict]:
    """Every shard of a finished cache, by shard path."""
    manifest = read_manifest(directory)
    fmt = get_format(manifest.format)
    return {s.path: fmt.read(manifest.shard_path(s)) for s in manifest.shards}


def cache_args(model: Path, data: Path, directory: Path, **extra) -> list[str]:
    """``key=value`` overrides for a small, fast cache run."""
    settings = {
        "teacher.model": model, "data.path": data, "data.seq_len": 64, "data.holdout_fraction": 0.1,
        "cache.dir": directory, "cache.shard_size": 8, "cache.batch_size": 4, "cache.chunk_size": 100,
        "cache.mode": "topk", "cache.top_k": 8, "device": "cpu",
    }
    settings.update(extra)
    return [f"{k}={v}" for k, v in settings.items()]

STUDENT = "{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2}"


def train_args(cache_dir: Path, out_dir: Path, **extra) -> list[str]:
    """``key=value`` overrides for a small, fast training run."""
    settings = {
        "cache.dir": cache_dir, "student.config": STUDENT, "train.out_dir": out_dir, "train.steps": 12,
        "train.batch_size": 4, "train.checkpoint_every": 4, "train.eval_every": 6, "train.log_every": 1,
        "train.warmup_steps": 2, "train.chunk_size": 50, "device": "cpu",
    }
    settings.update(extra)
    return [f"{k}={v}" for k, v in settings.items()]


def train(args: list[str]) -> Path:
    from pipeline.train.config import TrainJob
    from pipeline.train.run import train_from_cache

    return train_from_cache(load_config(TrainJob, None, args))


def train_interrupted_at(step: int, args: list[str], monkeypatch) -> None:
    """Run ``train(args)`` and interrupt it as its metrics record for ``step`` is written (after that step)."""
    from pipeline.train import recipe

    original = recipe.MetricsLog.write

    def crash(self, record):
        if record["step"] == step:
            raise KeyboardInterrupt("preempted")
        original(self, record)

    monkeypatch.setattr(recipe.MetricsLog, "write", crash)
    with pytest.raises(KeyboardInterrupt):
        train(args)
    monkeypatch.setattr(recipe.MetricsLog, "write", original)
