"""The batches of online on-policy distillation (``online``): prompts in a seeded order, completed by the student
as it is at that step.

The order is a function of (seed, epoch) alone, as the cache's is: global sample g is prompt
``permutation(seed, g // n)[g % n]`` of the n training prompts, and a step's ``global_batch`` samples are dealt
to the ranks and micro-batches in contiguous runs of ``batch_size``. Each completion draws from its own
generator, seeded from (seed, g), so a resumed run samples exactly what an uninterrupted one does.

A batch is the prompt and its completion, right-padded: position t is trained where token t + 1 is generated,
so the loss covers the completion only (its EOS included), and the padding after it is never attended to by the
positions that are trained.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from pipeline.config_loading import need, raise_problems
from pipeline.data.config import DataConfig
from pipeline.data.prompts import Prompt
from pipeline.models.decode import Sampling, decode, row_seed, stop_and_pad
from storage import StreamOrder, StreamState

Batch = dict[str, torch.Tensor]


@dataclass
class OnlineConfig:
    """``online``: GKD-style online on-policy distillation, the yardstick of staged on-policy rounds. Every step
    the student completes a batch of prompts and the live teacher (``loss.teacher_live``) scores each completion
    over the full vocabulary. The cache then serves only the held-out evaluation, the tokenizer and the vocabulary."""

    prompts: DataConfig = field(default_factory=DataConfig)
    """The prompts, read as ``distillery generate`` reads ``data.*``; the documents that
    ``prompts.holdout_fraction`` holds out are never trained on. The order is a function of (train.seed, epoch)."""
    max_new_tokens: int = 48
    """Longest completion the student writes."""
    temperature: float = 1.0
    """Sampling temperature of the student (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus of the student's sampling distribution."""

    def __post_init__(self):
        raise_problems(need(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}"),
                       need(self.temperature >= 0, "temperature", f"must be >= 0 (0 = greedy), got {self.temperature}"),
                       need(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}"))


@lru_cache(maxsize=2)
def _permutation(count: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(count)


def prompt_at(sample: int, count: int, seed: int) -> int:
    """Which of ``count`` prompts global sample ``sample`` is: the epoch's seeded permutation at its place."""
    epoch, place = divmod(sample, count)
    return int(_permutation(count, seed, epoch)[place])


def micro_batch_samples(order: StreamOrder, step: int, micro: int) -> range:
    """The global sample indices of this rank's micro-batch ``micro`` of optimizer step ``step``."""
    first = step * order.global_batch + (micro * order.world_size + order.rank) * order.batch_size
    return range(first, first + order.batch_size)


def as_batch(prompts: list[Prompt], completions: list[list[int]], samples: range, pad: int) -> Batch:
    """(B, T) ``input_ids`` right-padded with ``pad``, the (B, T) ``loss_mask`` of the completions, and the (B,)
    ``sample_index``."""
    width = max(len(p.ids) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        whole = list(prompt.ids) + completion
        ids[row, : len(whole)] = torch.tensor(whole)
        mask[row, len(prompt.ids) - 1 : len(whole) - 1] = True
    return {"input_ids": ids, "loss_mask": mask, "sample_index": torch.tensor(list(samples))}


class OnlineBatches:
    """The student's completions of the prompts, batch by batch, in the order above."""

    def __init__(self, prompts: list[Prompt], order: StreamOrder, tokenizer, sampling: Sampling):
        self.prompts, self.order, self.tokenizer, self.sampling = prompts, order, tokenizer, sampling

    def stream(self, model, state: StreamState) -> Iterator[Batch]:
        """Batches from ``state.samples`` on, sampled from ``model`` as it is when each batch is drawn."""
        o = self.order
        step = state.samples // o.global_batch
        eos_ids, pad = stop_and_pad(model, self.tokenizer)
        while True:
            for micro in range(o.grad_accum):
                samples = micro_batch_samples(o, step, micro)
                prompts = [self.prompts[prompt_at(g, len(self.prompts), o.seed)] for g in samples]
                model.eval()
                completions = decode(model, [p.ids for p in prompts], [row_seed(o.seed, g, 0) for g in samples],
                                     self.sampling, eos_ids, pad)
                model.train()
                yield as_batch(prompts, [c.ids for c in completions], samples, pad)
            step += 1
