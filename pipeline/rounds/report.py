"""``distillery report RUN_DIR``: a table of rounds plus loss and KL plots, written into the run directory."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.config_loading import load_config
from pipeline.errors import ConfigError
from pipeline.rounds.config import RunJob, round_dir
from pipeline.rounds.state import read_state
from pipeline.train.evaluate import score_against_teacher
from storage.atomic import atomic_write, write_text
from storage.manifest import read_manifest
from storage.writer import IDENTITY_NAME

# Every column has one format, whatever the magnitude of its values.
COLUMN_FORMATS = {"round": "{}", "teacher": "{}", "student params": "{:,}", "cache tokens": "{:,}",
                  "bytes/token": "{:.1f}", "cache": "{}", "KL to teacher": "{:.3f}", "KL to original": "{:.3f}",
                  "ppl": "{:.1f}", "top-1": "{:.3f}", "cache s": "{:.0f}", "train s": "{:.0f}"}
COLUMNS = list(COLUMN_FORMATS)


def _parameters(final: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(final)).parameters())


def round_row(job: RunJob, index: int, record: dict) -> dict:
    """Figures of one complete round."""
    cache, train = record["cache"], record["train"]
    manifest = read_manifest(cache["dir"])
    tokens = manifest.tokens
    final = Path(train["final"])
    own = score_against_teacher(final, Path(cache["teacher"]), Path(cache["dir"]))
    original = own if cache["teacher"] == job.teacher.model else score_against_teacher(
        final, Path(job.teacher.model), Path(cache["dir"]))
    teacher = cache["teacher"]
    if index > 1 and teacher == str(round_dir(job, index - 1) / "train" / "final"):
        teacher = f"round {index - 1} student"
    return {"round": index, "teacher": teacher,
            "student params": _parameters(final), "cache tokens": tokens,
            "bytes/token": manifest.bytes / tokens,
            "cache": "hit" if cache.get("hit") else "built", "KL to teacher": own["kl"],
            "KL to original": original["kl"], "ppl": own["ppl"], "top-1": own["top1"],
            "cache s": cache.get("seconds", 0.0), "train s": train.get("seconds", 0.0)}


def _cell(column: str, value) -> str:
    return "–" if value is None else COLUMN_FORMATS[column].format(value)


def _plots(run_dir: Path, rows: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for row in rows:
        metrics = run_dir / f"round-{row['round']}" / "train" / "metrics.jsonl"
        points = [json.loads(line) for line in metrics.read_text().splitlines()]
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


def read_run(run_dir: Path) -> tuple[RunJob, dict]:
    """The config and the per-round state of a run directory; a ``ConfigError`` says why ``run_dir`` is not one."""
    config = run_dir / "config.yaml"
    why = ("it does not exist" if not run_dir.exists() else "it is a file" if not run_dir.is_dir()
           else "it is a cache: see `distillery inspect`" if (run_dir / IDENTITY_NAME).is_file()
           else "it has no config.yaml" if not config.is_file() else None)
    if why is None:
        try:
            job = load_config(RunJob, config, [])
        except ConfigError as exc:
            why = f"its config.yaml is not a run's: {exc}"
        else:
            return job, read_state(run_dir)["rounds"]
    raise ConfigError(f"{run_dir} is not a Distillery run directory ({why}); give the run.dir of a `distillery run`")


def build_report(run_dir: str | Path) -> Path:
    """Write ``report.md``, ``report.json``, ``loss.png`` and ``kl.png`` for the complete rounds."""
    run_dir = Path(run_dir)
    job, state = read_run(run_dir)
    rows, pending = [], []
    for index in range(1, job.round_count() + 1):
        record = state.get(str(index), {})
        if record.get("cache", {}).get("status") == "done" and record.get("train", {}).get("status") == "done":
            rows.append(round_row(job, index, record))
        else:
            pending.append(index)
    lines = [f"# Distillery run report: {run_dir}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(c, row[c]) for c in COLUMNS) + " |" for row in rows]
    lines += ["", "KL is per-token KL(teacher || student) over the full vocabulary on the held-out split of the "
              "round's cache; ppl and top-1 (agreement with the round's teacher) on the same tokens."]
    if pending:
        lines += ["", f"Rounds not complete yet: {pending}."]
    if rows:
        lines += [""] + [f"![{name}]({name})" for name in _plots(run_dir, rows)]
    write_text(run_dir / "report.json", json.dumps(rows, indent=2) + "\n")
    write_text(run_dir / "report.md", "\n".join(lines) + "\n")
    return run_dir / "report.md"


def format_status(run_dir: str | Path) -> str:
    """One line per round and stage: status, cache hit, wall time, and any lock holders."""
    run_dir = Path(run_dir)
    job, state = read_run(run_dir)
    lines = [f"run {run_dir}"]
    for index in range(1, job.round_count() + 1):
        for stage in ("cache", "train"):
            record = state.get(str(index), {}).get(stage, {})
            extra = f" ({'hit' if record.get('hit') else 'built'})" if stage == "cache" and record.get("status") else ""
            locks = sorted((run_dir / f"round-{index}").glob(f".{stage}.*.lock"))
            held = "".join(f"; locked by {json.loads(p.read_text() or '{}')}" for p in locks)
            seconds = f", {record['seconds']:.0f} s" if "seconds" in record else ""
            lines.append(f"round {index} {stage:5s} {record.get('status', 'pending')}{extra}{seconds}{held}")
    return "\n".join(lines)
