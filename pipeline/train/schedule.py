"""The learning-rate schedule and the phase of a step: pure functions of the step index."""
from __future__ import annotations

import math

from pipeline.train.config import Phase


def lr_at(step: int, phases: list[Phase], warmup: int, min_ratio: float) -> float:
    """Linear warmup then cosine decay to ``min_ratio * lr``, restarted in each phase."""
    for phase in phases:
        if step < phase.steps:
            if step < warmup:
                return phase.lr * (step + 1) / warmup
            progress = (step - warmup) / max(phase.steps - warmup, 1)
            return phase.lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        step -= phase.steps
    return phases[-1].lr * min_ratio


def phase_at(step: int, phases: list[Phase]) -> tuple[int, Phase]:
    """The index and settings of the phase that optimizer step ``step`` (0-based) belongs to."""
    for index, phase in enumerate(phases):
        if step < phase.steps:
            return index, phase
        step -= phase.steps
    return len(phases) - 1, phases[-1]
