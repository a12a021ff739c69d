"""``distillery report RUN_DIR``: a table of rounds plus loss and KL plots, written into the run directory.

A run directory at a URL is read through a local copy under ``local_dir`` (its students and teachers too, to
score them), and the report and plots are uploaded into it.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.config_loading import load_config
from pipeline.errors import ConfigError
from pipeline.models.hf import local_model
from pipeline.rounds.config import RunJob, previous_final, round_name, train_dir
from pipeline.rounds.state import STATE_NAME, read_state
from pipeline.train.evaluate import score_against_teacher
from pipeline.train.metrics import METRICS_NAME
from storage import CONFIG_NAME, IDENTITY_NAME, Mirror, atomic_write, open_cache, write_text

# Every column has one format, whatever the magnitude of its values.
COLUMN_FORMATS = {"round": "{}", "teacher": "{}", "student params": "{:,}", "cache tokens": "{:,}",
                  "bytes/token": "{:.1f}", "cache": "{}", "KL to teacher": "{:.3f}", "KL to original": "{:.3f}",
                  "ppl": "{:.1f}", "top-1": "{:.3f}", "cache s": "{:.0f}", "train s": "{:.0f}"}
COLUMNS = list(COLUMN_FORMATS)


def _parameters(final: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(final)).parameters())


def round_row(job: RunJob, index: int, record: dict, local_dir: str | None = None) -> dict:
    """Figures of one complete round (models at URLs are scored from local copies under ``local_dir``)."""
    cache, train = record["cache"], record["train"]
    manifest = open_cache(cache["dir"], local_dir, job.cache.local_bytes).manifest
    tokens = manifest.tokens
    final = Path(local_model(train["final"], local_dir, f"round {index}'s student"))
    own = score_against_teacher(final, Path(local_model(cache["teacher"], local_dir)), cache["dir"],
                                local_dir=local_dir)
    original = own if cache["teacher"] == job.teacher.model else score_against_teacher(
        final, Path(local_model(job.teacher.model, local_dir)), cache["dir"], local_dir=local_dir)
    teacher = cache["teacher"]
    if index > 1 and teacher == previous_final(job, index):
        teacher = f"round {index - 1} student"
    return {"round": index, "teacher": teacher,
            "student params": _parameters(final), "cache tokens": tokens,
            "bytes/token": manifest.bytes / tokens,
            "cache": "hit" if cache.get("hit") else "built", "KL to teacher": own["kl"],
            "KL to original": original["kl"], "ppl": own["ppl"], "top-1": own["top1"],
            "cache s": cache.get("seconds", 0.0), "train s": train.get("seconds", 0.0)}


def _cell(column: str, value) -> str:
    return "–" if value is None else COLUMN_FORMATS[column].format(value)


def _metrics(job: RunJob, index: int, local_dir: str | None) -> list[dict]:
    """The records of round ``index``'s training, from its ``train.out_dir`` (a local copy for a URL)."""
    out = Mirror(train_dir(job, index), local_dir)
    out.pull(METRICS_NAME)
    return [json.loads(line) for line in (out.local / METRICS_NAME).read_text().splitlines()]


def _plots(run: Mirror, job: RunJob, rows: list[dict], local_dir: str | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = run.local
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for row in rows:
        points = _metrics(job, row["round"], local_dir)
        train = [p for p in points if p["type"] == "train"]
        axis.plot([p["step"] for p in train], [p["loss"] for p in train], label=f"round {row['round']}")
    axis.set(xlabel="step", ylabel="training loss", title="Training loss per round")
    axis.legend()
    names = ["loss.png", "kl.png"]
    _save(figure, run_dir / names[0])
    figure, axis = plt.subplots(figsize=(6, 3.5))
    x = [row["round"] for row in rows]
    axis.bar([i - 0.2 for i in x], [row["KL to teacher"] for row in rows], width=0.4, label="to its teacher")
    axis.bar([i + 0.2 for i in x], [row["KL to original"] for row in rows], width=0.4, label="to the original teacher")
    axis.set(xlabel="round", ylabel="held-out KL (nats/token)", title="Held-out KL per round", xticks=x)
    axis.legend()
    _save(figure, run_dir / names[1])
    plt.close("all")
    return names


def _save(figure, path: Path) -> None:
    with atomic_write(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def _why_not_a_run(run: Mirror) -> str | None:
    """Why ``run`` is not a run directory; None once its ``config.yaml`` is downloaded (for a URL)."""
    if run.exists(IDENTITY_NAME):
        return "it is a cache: see `distillery inspect`"
    if run.pull(CONFIG_NAME):
        return None
    if not run.exists(""):
        return "it does not exist"
    # A folder lists its entries; only a file (or, locally, an empty folder) lists none.
    return "it is a file" if not run.names() and not run.local.is_dir() else "it has no config.yaml"


def read_run(run: Mirror) -> tuple[RunJob, dict]:
    """The config and the per-round state of a run directory (downloaded first for a URL); a ``ConfigError``
    says why it is not one."""
    why = _why_not_a_run(run)
    if why is None:
        run.pull(STATE_NAME)
        try:
            job = load_config(RunJob, run.local / CONFIG_NAME, [])
        except ConfigError as exc:
            why = f"its config.yaml is not a run's: {exc}"
        else:
            return job, read_state(run)["rounds"]
    raise ConfigError(f"{run.name} is not a Distillery run directory ({why}); give the run.dir of a `distillery run`")


def build_report(run_dir: str | Path, local_dir: str | None = None) -> Path:
    """Write ``report.md``, ``report.json``, ``loss.png`` and ``kl.png`` for the complete rounds (and upload
    them, for a run at a URL); return the local ``report.md``."""
    run = Mirror(run_dir, local_dir)
    job, state = read_run(run)
    rows, pending = [], []
    for index in range(1, job.round_count() + 1):
        record = state.get(str(index), {})
        if record.get("cache", {}).get("status") == "done" and record.get("train", {}).get("status") == "done":
            rows.append(round_row(job, index, record, local_dir))
        else:
            pending.append(index)
    lines = [f"# Distillery run report: {run.name}", "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(c, row[c]) for c in COLUMNS) + " |" for row in rows]
    lines += ["", "KL is per-token KL(teacher || student) over the full vocabulary on the held-out split of the "
              "round's cache; ppl and top-1 (agreement with the round's teacher) on the same tokens."]
    if pending:
        lines += ["", f"Rounds not complete yet: {pending}."]
    plots = _plots(run, job, rows, local_dir) if rows else []
    if plots:
        lines += [""] + [f"![{name}]({name})" for name in plots]
    write_text(run.local / "report.json", json.dumps(rows, indent=2) + "\n")
    write_text(run.local / "report.md", "\n".join(lines) + "\n")
    for name in [*plots, "report.json", "report.md"]:
        run.push(name)
    return run.local / "report.md"


def format_status(run_dir: str | Path, local_dir: str | None = None) -> str:
    """One line per round and stage: status, cache hit, wall time, and any lock holders (of this node's working
    copy, for a run at a URL)."""
    run = Mirror(run_dir, local_dir)
    job, state = read_run(run)
    run_dir = run.local
    lines = [f"run {run.name}"]
    for index in range(1, job.round_count() + 1):
        for stage in ("cache", "train"):
            record = state.get(str(index), {}).get(stage, {})
            extra = f" ({'hit' if record.get('hit') else 'built'})" if stage == "cache" and record.get("status") else ""
            locks = sorted((run_dir / round_name(index)).glob(f".{stage}.*.lock"))
            held = "".join(f"; locked by {json.loads(p.read_text() or '{}')}" for p in locks)
            seconds = f", {record['seconds']:.0f} s" if "seconds" in record else ""
            lines.append(f"round {index} {stage:5s} {record.get('status', 'pending')}{extra}{seconds}{held}")
    return "\n".join(lines)
