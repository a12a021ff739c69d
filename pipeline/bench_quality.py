"""Distillation quality: train students for equal steps and score them against the live teacher."""
from __future__ import annotations

import time
from pathlib import Path

from pipeline.config_loading import load_config
from pipeline.scoring import score_against_teacher
from pipeline.train_config import TrainJob
from pipeline.train_jobs import train_from_cache


def train_and_score(name: str, overrides: list[str], teacher_dir: Path, eval_cache: Path) -> dict:
    """Train one student with ``distillery train`` overrides, then score it against the teacher."""
    start = time.perf_counter()
    final = train_from_cache(load_config(TrainJob, None, overrides))
    seconds = time.perf_counter() - start
    return {"student": name, "train_seconds": seconds, **score_against_teacher(final, teacher_dir, eval_cache)}
