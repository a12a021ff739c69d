"""Helpers shared by the tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.config import CacheJob
from pipeline.cache.run import CacheResult, run_cache
from pipeline.config_loading import load_config
from storage.read.reader import read_shard
from storage.remote.store import open_cache


def skip_marked(items, marker: str, reason: str) -> None:
    """Skip every collected test that carries ``marker`` (for markers that only a make target enables)."""
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker(marker):
            item.add_marker(skip)


def make_targets(layout, n: int = 5, seq_len: int = 7, seed: int = 0, high_ids: bool = True) -> dict[str, np.ndarray]:
    """Random targets (``storage.codec.targets``) for ``layout``: distinct head ids by descending log-prob, a few -inf
    log-probs, and distinct sampled ids with counts summing to N, some slots unused; with ``high_ids`` the
    largest id of the vocabulary occurs."""
    rng = np.random.default_rng(seed)
    vocab, head, width = layout.vocab_size, layout.head_width, layout.sample_width
    distinct = np.stack([rng.choice(vocab, head + width, replace=False) for _ in range(n * seq_len)]).astype(np.int32)
    if high_ids:
        distinct[0, 0] = vocab - 1
    else:
        distinct %= min(vocab, 60_000)
    distinct = distinct.reshape(n, seq_len, -1)
    targets = {"input_ids": rng.integers(0, vocab, (n, seq_len), dtype=np.int32),
               "loss_mask": rng.integers(0, 2, (n, seq_len), dtype=np.uint8)}
    if head:
        logprobs = -np.sort(rng.exponential(3.0, (n, seq_len, head)), axis=-1).astype(np.float32)
        logprobs[0, 0, -1] = -np.inf
        targets |= {"head_ids": distinct[..., :head], "head_logprobs": logprobs,
                    "tail_logprob": np.log(rng.uniform(0.01, 1, (n, seq_len))).astype(np.float32)}
    if width:
        used = rng.integers(1, min(width, layout.samples) + 1, (n, seq_len))
        counts = np.zeros((n, seq_len, width), dtype=np.int32)
        for index in np.ndindex(n, seq_len):
            counts[index][: used[index]] = rng.multinomial(layout.samples - used[index], np.ones(used[index]) / used[index]) + 1
        ids = np.where(counts > 0, np.sort(distinct[..., head:], axis=-1), -1)
        order = np.argsort(np.where(ids < 0, vocab, ids), axis=-1)
        targets |= {"sample_ids": np.take_along_axis(ids, order, -1), "sample_counts": np.take_along_axis(counts, order, -1)}
    return targets


def cache(args: list[str], **kwargs) -> CacheResult:
    return run_cache(load_config(CacheJob, None, args), **kwargs)


def read_all(directory: Path) -> dict[str, dict]:
    """Every shard of a finished cache as its reader arrays, by shard path."""
    opened = open_cache(directory)
    return {s.path: read_shard(opened, s) for s in opened.manifest.shards}


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
