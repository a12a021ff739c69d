"""The run report's figures, from each round's ``metrics.jsonl`` and the report's rows.

``curves.png``: two panels over the steps of every round, the training loss (the ``train`` records) and the
held-out KL to the round's cache (the ``eval`` records), to see whether a round was still learning when it
stopped; ``kl.png``: each round's final held-out KL to its own teacher and to the run's original teacher.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.rounds.config import RunJob, train_dir
from pipeline.train.metrics import METRICS_NAME
from storage import Mirror, atomic_write

CURVES_NAME = "curves.png"
KL_NAME = "kl.png"


def round_metrics(job: RunJob, index: int, local_dir: str | None) -> list[dict]:
    """The records of round ``index``'s training, from its ``train.out_dir`` (a local copy for a URL)."""
    out = Mirror(train_dir(job, index), local_dir)
    out.pull(METRICS_NAME)
    return [json.loads(line) for line in (out.local / METRICS_NAME).read_text().splitlines()]


def _curves(plt, job: RunJob, rows: list[dict], local_dir: str | None):
    figure, (loss, kl) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    for row in rows:
        records = round_metrics(job, row["round"], local_dir)
        train = [r for r in records if r["type"] == "train"]
        evals = [r for r in records if r["type"] == "eval" and r.get("kl") is not None]
        label = f"round {row['round']}"
        loss.plot([r["step"] for r in train], [r["loss"] for r in train], label=label)
        # Few evaluations (often one, at the last step): markers keep a single point visible.
        kl.plot([r["step"] for r in evals], [r["kl"] for r in evals], marker="o", label=label)
    loss.set(xlabel="step", ylabel="training loss", title="Training loss")
    kl.set(xlabel="step", ylabel="held-out KL (nats/token)", title="Held-out KL to the round's cache")
    for axis in (loss, kl):
        axis.grid(alpha=0.3)
        axis.legend()
    return figure


def _kl_bars(plt, rows: list[dict]):
    figure, axis = plt.subplots(figsize=(6, 3.5), layout="constrained")
    x = [row["round"] for row in rows]

    def heights(column: str) -> list[float]:  # a student of another tokenizer has no KL: no bar
        return [float("nan") if row[column] is None else row[column] for row in rows]

    axis.bar([i - 0.2 for i in x], heights("KL to teacher"), width=0.4, label="to its teacher")
    axis.bar([i + 0.2 for i in x], heights("KL to original"), width=0.4, label="to the original teacher")
    axis.set(xlabel="round", ylabel="held-out KL (nats/token)", title="Held-out KL per round", xticks=x)
    axis.legend()
    return figure


def write_plots(run_dir: Path, job: RunJob, rows: list[dict], local_dir: str | None) -> list[str]:
    """Write the figures of the complete rounds ``rows`` into ``run_dir``; return their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {CURVES_NAME: _curves(plt, job, rows, local_dir), KL_NAME: _kl_bars(plt, rows)}
    for name, figure in figures.items():
        with atomic_write(run_dir / name) as tmp:
            figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close("all")
    return list(figures)
