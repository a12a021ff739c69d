"""Entry points of ``distillery train`` (from a cache) and ``distillery pretrain`` (from raw text)."""
from __future__ import annotations

from pathlib import Path

from pipeline.config_loading import to_yaml
from pipeline.data import prepare_splits
from pipeline.errors import ConfigError
from pipeline.sources import cache_source, text_source
from pipeline.train import run_training
from pipeline.train_config import LossConfig, Phase, PretrainJob, TrainJob, resolve_phases


def train_from_cache(job: TrainJob) -> Path:
    """Distil a student from the cached soft targets in ``job.cache.dir``."""
    source = cache_source(job.cache.dir, job.cache.eval_dir, job.train.batch_size, job.train.seed,
                          job.cache.shuffle_buffer, job.cache.verify, job.train.num_workers)
    phases = resolve_phases(job.train, job.loss)
    for index, phase in enumerate(phases):
        retempered = phase.loss.temperature not in (None, source.temperature)
        if source.mode in ("sample", "hybrid") and retempered and phase.loss.kind != "ce" and not phase.loss.teacher_live:
            raise ConfigError(
                f"loss.temperature {phase.loss.temperature} (phase {index}) differs from the temperature of sample-mode "
                f"cache {job.cache.dir} ({source.temperature}); sampled counts cannot be re-tempered, so cache again "
                f"with cache.temperature={phase.loss.temperature}"
            )
    return run_training(source, job.student, job.train, phases, job.device, to_yaml(job))


def pretrain(job: PretrainJob) -> Path:
    """Train a model with cross-entropy on raw text (the demo teacher, or a CE-only baseline)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job.tokenizer)
    splits = prepare_splits(job.data, tokenizer)
    source = text_source(splits, tokenizer, job.train.batch_size, job.train.seed)
    phases = [Phase(job.train.steps, job.train.lr, LossConfig(kind="ce"))]
    return run_training(source, job.student, job.train, phases, job.device, to_yaml(job))
