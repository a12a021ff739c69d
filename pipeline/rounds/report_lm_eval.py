"""Benchmark scores of each round's student, where ``distillery eval`` left them: ``lm_eval.json`` beside the
round's ``final/`` (in its ``train.out_dir``), written by lm-evaluation-harness runs as
``{"model": str, "tasks": {task: {metric: float}}, "limit": int | None, "num_fewshot": int | None,
"lm_eval_version": str}``. The report shows one main metric per task; a round without the file has no row.
"""
from __future__ import annotations

import json

from pipeline.rounds.config import RunJob, train_dir
from storage import Mirror

LM_EVAL_NAME = "lm_eval.json"
"""What ``distillery eval`` writes beside a ``final/``: ``{"model", "tasks": {task: {metric: value}}, "limit",
"num_fewshot", "chat_template", "lm_eval_version"}``."""
MAIN_METRICS = ("acc_norm", "acc", "exact_match", "f1", "mc2", "bleu", "word_perplexity")
"""The metric shown for a task, the first of these it has (else its first number)."""


def _main_metric(metrics: dict) -> tuple[str, float] | None:
    """``(metric, value)`` of a task's metrics (``acc`` or lm-eval's own ``acc,none``; never a stderr)."""
    numbers = {key: value for key, value in metrics.items()
               if isinstance(value, int | float) and not isinstance(value, bool) and "stderr" not in key}
    by_name = {key.split(",")[0]: key for key in numbers}
    for name in MAIN_METRICS:
        if name in by_name:
            return name, float(numbers[by_name[name]])
    first = next(iter(numbers), None)
    return None if first is None else (first.split(",")[0], float(numbers[first]))


def read_lm_eval(job: RunJob, index: int, local_dir: str | None) -> dict | None:
    """Round ``index``'s ``lm_eval.json``; None when there is none, or it is not the schema above."""
    out = Mirror(train_dir(job, index), local_dir)
    if not out.pull(LM_EVAL_NAME):
        return None
    try:
        scores = json.loads((out.local / LM_EVAL_NAME).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(scores, dict) and isinstance(scores.get("tasks"), dict)
    return scores if ok and all(isinstance(m, dict) for m in scores["tasks"].values()) else None


def lm_eval_table(job: RunJob, rounds: list[int], local_dir: str | None) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)``: a row per round with scores, a column per task's main metric; no rows without any."""
    found = {index: scores for index in rounds if (scores := read_lm_eval(job, index, local_dir))}
    columns: dict[tuple[str, str], None] = {}
    for scores in found.values():
        for task, metrics in scores["tasks"].items():
            main = _main_metric(metrics)
            if main:
                columns[(task, main[0])] = None
    rows = []
    for index, scores in found.items():
        cells = []
        for task, metric in columns:
            main = _main_metric(scores["tasks"].get(task, {}))
            cells.append(f"{main[1]:.3f}" if main and main[0] == metric else "–")
        limit, shots = scores.get("limit"), scores.get("num_fewshot")
        rows.append([str(index), *cells, "all" if limit is None else str(limit),
                     "–" if shots is None else str(shots)])
    return ["round", *(f"{task} ({metric})" for task, metric in columns), "limit", "few-shot"], rows
