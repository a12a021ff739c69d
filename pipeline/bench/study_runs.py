"""One study run (an arm, a seed): claimed by one process, trained, scored at its checkpoints, kept as a record.

Several ``distillery study`` processes may share a work folder: each run is claimed with an ``flock`` on
``runs/.<name>-seed<seed>.lock`` while it trains, so a process that finishes its own teacher early can train
another teacher's runs (``--help-with``) while that teacher's own process waits for them and reports them.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from pipeline.bench.quality import arm_overrides, bytes_per_token, train_student
from pipeline.log import get_logger
from pipeline.train.checkpoint import CHECKPOINTS, checkpoint_dirs, load_model_weights, read_state
from pipeline.train.evaluate import TeacherReference
from storage import lock_file, unlock, write_text

log = get_logger("study")


def score_checkpoints(out_dir: Path, final: Path, reference: TeacherReference) -> list[dict]:
    """Score each checkpoint of a run but the last (its weights are ``final``), then delete them."""
    from transformers import AutoModelForCausalLM

    scored = []
    for path in checkpoint_dirs(out_dir / CHECKPOINTS)[:-1]:
        model = AutoModelForCausalLM.from_pretrained(str(final))
        load_model_weights(path, model)
        scored.append({"step": read_state(path)["step"], **reference.score(model)})
    shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
    return scored


def finished_record(out_dir: Path, cache_dir: Path) -> dict | None:
    """The run's kept record if it was trained on ``cache_dir``; a record from another cache is deleted."""
    done = out_dir / "record.json"
    if not done.is_file():
        return None
    record = json.loads(done.read_text())
    if record.get("cache_fingerprint") == cache_dir.name:
        return record
    log.info(f"{done} was trained on another cache than {cache_dir}; its run is trained again")
    shutil.rmtree(out_dir)
    return None


def run_arm(name: str, cache_dir: Path, extra: list[str], seed: int, context: dict, wait: bool = True) -> dict | None:
    """Train one arm for one seed and score it at each checkpoint and at its end, or reuse its finished record.

    When another process holds the run's claim: with ``wait``, wait for it and take its record (or train the
    run, if that process died first); without, return None at once.
    """
    out_dir = context["work"] / "runs" / f"{name}-seed{seed}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    claim = lock_file(out_dir.parent / f".{out_dir.name}.lock", wait=wait)
    if claim is None:
        return None
    try:
        return finished_record(out_dir, cache_dir) or _train_and_record(name, cache_dir, extra, seed, context, out_dir)
    finally:
        unlock(claim)


def _train_and_record(name: str, cache_dir: Path, extra: list[str], seed: int, context: dict, out_dir: Path) -> dict:
    final, seconds = train_student(arm_overrides(cache_dir, seed, out_dir, context["common"], extra,
                                                 context["teacher"]))
    start = time.perf_counter()
    steps = [*score_checkpoints(out_dir, final, context["reference"]),
             {"step": context["profile"].steps, **context["reference"].score(final)}]
    uses_cache = not any(e.startswith(("loss.teacher_live", "loss.kind=ce")) for e in extra)
    record = {"teacher": context["label"], "student": name, "seed": seed, "cache_fingerprint": cache_dir.name,
              **steps[-1], "steps": steps, "train_seconds": seconds, "score_seconds": time.perf_counter() - start,
              "cache_bytes_per_token": bytes_per_token(cache_dir) if uses_cache else None}
    write_text(out_dir / "record.json", json.dumps(record, indent=2) + "\n")
    return record


def run_all(planned: list[tuple], caches: dict[str, Path], context: dict, wait: bool) -> list[dict]:
    """Every planned (name, cache name, overrides, seed) run, in order. Runs another process has claimed come
    last: with ``wait`` their records are awaited, without they are left to that process (and not returned)."""
    records: list[dict | None] = [run_arm(n, caches[c], extra, seed, context, wait=False) for n, c, extra, seed in planned]
    if wait:
        records = [r or run_arm(n, caches[c], extra, seed, context) for r, (n, c, extra, seed) in zip(records, planned)]
    return [r for r in records if r is not None]
