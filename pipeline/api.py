"""Distillery's public Python API: the stages as functions, and a cache as a PyTorch dataset with its loss.

Everything a script needs is here, and ``pipeline`` re-exports it (``from pipeline import CacheDataset``). The
stage functions are what the ``distillery`` commands call, with the same typed jobs and the same errors (for bad
input, an exception whose message names the key or file and what to do; the commands print it as one line).
``CacheDataset``, ``collate`` and ``kd_loss`` let another training loop (your own, or ``transformers.Trainer``:
``examples/hf_trainer.py``) read a cache in the order ``distillery train`` reads it and minimise the loss it
minimises. Every other module of ``pipeline`` and ``storage`` is private: it may change in any release.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset

from pipeline.cache.config import CacheJob
from pipeline.config_loading import build_config, merge, need, parse_overrides, raise_problems, read_yaml
from pipeline.generate.config import GenerateJob
from pipeline.rounds.config import RunJob
from pipeline.train.config import LossConfig, SourceConfig, TrainJob
from pipeline.train.sources import BatchSource, cache_source
from pipeline.train.step import LossFacts, combine, hidden_sums, token_counts
from storage import StreamOrder, StreamState

__all__ = ["CacheDataset", "CacheJob", "GenerateJob", "LossConfig", "RunJob", "TrainJob", "collate", "kd_loss",
           "load_job", "run_cache", "run_generate", "run_pipeline", "run_train"]

Job = TypeVar("Job")


def load_job(job_class: type[Job], config: Mapping | str | Path | None = None,
             overrides: Sequence[str] | str = ()) -> Job:
    """A job built as the command line builds it: ``config`` (a YAML file's path, or the same mapping as a dict)
    with dotted ``key=value`` ``overrides`` on top, every problem reported in one ``ConfigError``.

    ``load_job(TrainJob, "train.yaml", ["train.steps=200"])`` is ``distillery train --config train.yaml
    train.steps=200``; ``load_job(CacheJob, {"teacher": {"model": "gpt2"}})`` needs no file.
    """
    data = read_yaml(config) if isinstance(config, (str, Path)) else dict(config or {})
    pairs = [overrides] if isinstance(overrides, str) else list(overrides)
    return build_config(job_class, merge(data, parse_overrides(pairs)))


def run_cache(job: CacheJob, num_tasks: int = 1, task_index: int = 0) -> Path | str:
    """``distillery cache``: run the teacher once and store its soft targets; return the cache's directory (a URL
    for a URL ``cache.root``). A finished cache with the same fingerprint is reused. With ``num_tasks`` > 1 this
    call writes part ``task_index``, and the part that finishes last writes the manifest."""
    from pipeline.cache.run import run_cache as run

    return run(job, num_tasks=num_tasks, task_index=task_index).directory


def run_generate(job: GenerateJob, num_tasks: int = 1, task_index: int = 0) -> Path | str:
    """``distillery generate``: write a model's completions of prompts; return the generation folder. Parts as in
    ``run_cache``."""
    from pipeline.generate.run import run_generate as run

    return run(job, num_tasks, task_index).directory


def run_train(job: TrainJob) -> Path | str:
    """``distillery train``: distil a student from a cache (resuming from ``train.out_dir``'s latest checkpoint);
    return where its ``final/`` folder is. Under ``torchrun`` every process calls it."""
    from pipeline.train.run import train_from_cache

    return train_from_cache(job)


def run_pipeline(job: RunJob, round_index: int | None = None, stage: str | None = None) -> Path | str:
    """``distillery run``: the rounds of a multi-round pipeline, skipping finished work; return ``run.dir``.
    ``round_index`` (1-based) and ``stage`` (``prepare``, ``generate``, ``cache`` or ``train``) select one piece;
    a whole run ends by writing ``report.md`` into ``run.dir``, as the command does."""
    from pipeline.dist import world
    from pipeline.rounds.report import build_report
    from pipeline.rounds.run import run_pipeline as run

    run_dir = run(job, round_index, stage)
    if round_index is None and stage is None and world().is_main:
        build_report(run_dir, job.cache.local_dir)
    return run_dir


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """The given place in the job, or torch.distributed's once it is initialised, else a lone process."""
    raise_problems(need((rank is None) == (world_size is None), "rank", "give rank and world_size together, or "
                                                                       "neither (torch.distributed's, else 0 and 1)"))
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class CacheDataset(IterableDataset):
    """A cache's training sequences, endlessly and in ``distillery train``'s order: one dict per sequence.

    Each dict holds ``input_ids`` (T,) int64, ``topk_ids`` (T, W) int64 (-1 in unused slots), ``topk_logprobs``
    (T, W) float32, ``tail_logprob`` (T,) float32, ``loss_mask`` (T,) bool and ``sample_index`` () int64 (the
    sequence's index in the split); a cache with text alignment adds ``token_role`` (T,) uint8 (and
    ``target_bytes``). Read it with ``DataLoader(dataset, batch_size=batch_size, collate_fn=collate)``: every
    batch is then the micro-batch that ``distillery train`` gives this rank at the same point, for any number of
    DataLoader workers. The order is a function of ``(seed, epoch)`` and of the rank's place in the job, as
    ``distillery train`` with ``train.batch_size``, ``train.seed``, ``train.grad_accum`` and
    ``cache.shuffle_buffer`` of these values, so a job may resume on another number of ranks.

    ``rank`` and ``world_size`` default to torch.distributed's once it is initialised (create the dataset after
    ``init_process_group``), else 0 and 1. ``start_step`` skips the optimizer steps already taken, as a resumed
    ``distillery train`` does. ``cache`` may be a URL, read through local shard copies under ``local_dir``.
    """

    def __init__(self, cache: str | Path, batch_size: int, *, seed: int = 0, shuffle_buffer: int = 1024,
                 grad_accum: int = 1, rank: int | None = None, world_size: int | None = None, start_step: int = 0,
                 draws_per_epoch: int | None = None, local_dir: str | None = None, verify: bool = True):
        rank, world_size = _rank_and_world(rank, world_size)
        raise_problems(need(batch_size >= 1, "batch_size", f"must be >= 1, got {batch_size}"),
                       need(grad_accum >= 1, "grad_accum", f"must be >= 1, got {grad_accum}"),
                       need(0 <= rank < world_size, "rank", f"must be in [0, world_size={world_size}), got {rank}"),
                       need(start_step >= 0, "start_step", f"must be >= 0, got {start_step}"))
        self._settings = SourceConfig(dir=str(cache), verify=verify, shuffle_buffer=shuffle_buffer,
                                     local_dir=local_dir, draws_per_epoch=draws_per_epoch)
        self._order = StreamOrder(batch_size, seed, shuffle_buffer, rank, world_size, grad_accum)
        self._start = StreamState(start_step * self._order.global_batch)
        self._source: BatchSource | None = cache_source(self._settings, self._order, num_workers=0)
        self.tokenizer = self._source.tokenizer
        """The cache's tokenizer (save it with the student)."""
        self.real_vocab = self._source.real_vocab
        """The tokenizer's length: logits at or beyond it are padding rows, which ``kd_loss`` ignores."""
        self.temperature = self._source.temperature
        """The teacher temperature the cache was written at (``kd_loss``'s ``cache_temperature``)."""

    def __getstate__(self) -> dict:
        """DataLoader workers started by spawn get a copy without the open cache; each reopens it, unverified."""
        return {**self.__dict__, "_source": None, "tokenizer": None, "_settings": replace(self._settings, verify=False)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._source is None:
            self._source = cache_source(self._settings, self._order, num_workers=0)
        for batch in self._source.stream(self._start):
            for row in range(len(batch["input_ids"])):
                yield {name: values[row] for name, values in batch.items()}


def collate(sequences: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``CacheDataset``'s dicts stacked into one batch dict with a leading (B,) axis, as ``kd_loss`` takes it.

    Every sequence of a cache has the same length and width, so stacking is all it takes: nothing is padded.
    """
    return {name: torch.stack([sequence[name] for sequence in sequences]) for name in sequences[0]}


def _as_float(logits: torch.Tensor) -> torch.Tensor:
    return logits.float()


def kd_loss(student_logits: torch.Tensor, batch: dict[str, torch.Tensor], loss: LossConfig | None = None, *,
            real_vocab: int, cache_temperature: float) -> torch.Tensor:
    """The scalar loss ``distillery train`` minimises on one batch: ``alpha * CE + (1 - alpha) * KD`` at the loss
    temperature, each a mean over the batch's valid tokens, in fp32 and without a dense teacher distribution.

    ``student_logits`` (B, T, V) any float dtype: the student's output on ``batch["input_ids"]`` (rows from
    ``real_vocab`` on are ignored). ``batch``: ``collate``'s dict (other keys are ignored). ``loss``: the ``loss.*``
    settings of ``distillery train`` (default forward KL with the tail as one bucket); a live teacher and
    cross-tokenizer losses are not taken. ``real_vocab`` and ``cache_temperature``: ``CacheDataset.real_vocab``
    and ``CacheDataset.temperature``. Returns a float32 scalar with gradients.
    """
    loss = loss or LossConfig()
    raise_problems(need(not loss.teacher_live, "loss.teacher_live", "is not taken by kd_loss (cached targets "
                                                                   "only); use distillery train for a live teacher"),
                   need(not loss.cross_tokenizer, "loss.cross_tokenizer", "is not taken by kd_loss, whose student "
                                                                         "shares the cache's tokenizer"),
                   need(student_logits.shape[-1] >= real_vocab, "real_vocab", f"is {real_vocab}, more than the "
                        f"{student_logits.shape[-1]} logits per position: the student must cover the tokenizer"))
    facts = LossFacts(real_vocab=real_vocab, cache_temperature=cache_temperature)
    positions = max(student_logits.shape[0] * student_logits.shape[1], 1)
    kd_sum, ce_sum = hidden_sums(student_logits, _as_float, batch, loss, facts, chunk_size=positions)
    kd_tokens, ce_tokens = token_counts(batch).tolist()
    return combine(kd_sum, ce_sum, kd_tokens, ce_tokens, loss)
