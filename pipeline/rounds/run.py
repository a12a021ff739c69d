"""Stage 3, ``distillery run``: rounds of ([generate,] cache, train), each stage resumable and its own job.

The run directory holds ``config.yaml``, ``state.json``, one ``round-N/``
folder per round (``generations/`` for a round that generates, ``cache.json``
pointing at the shared cache, ``train/`` with ``final/``), and ``report.md``
with its plots. A stage that is complete
in ``state.json`` is skipped; an interrupted one resumes, because both
stages resume by themselves.

``run.dir`` may be a URL. The run then works in a local copy (``cache.local_dir``), uploads ``config.yaml``,
``state.json`` after every update and each ``cache.json``, and each round's training uploads its own
``round-N/train``; round n's teacher is downloaded from round n-1's uploaded ``final/``. Stage locks stay
local: run one scheduler job per stage at a time.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.cache.plan import prepare_tokens
from pipeline.cache.run import run_cache
from pipeline.config_loading import to_yaml
from pipeline.dist import world
from pipeline.errors import ConfigError
from pipeline.generate.run import run_generate
from pipeline.log import get_logger
from pipeline.rounds.config import (
    RunJob,
    cache_job,
    generate_job,
    job_round,
    previous_final,
    round_name,
    run_mirror,
    stages_of,
    teacher_of,
    train_dir,
    train_job,
)
from pipeline.rounds.state import STATE_NAME, read_state, stage_lock, stage_record, update_stage
from pipeline.train.recipe import final_exists
from pipeline.train.resume import changed_settings, result_settings
from pipeline.train.run import train_from_cache
from pipeline.train.trackers import RoundGroup, require_trackers
from storage import CONFIG_NAME, CacheNotFoundError, Mirror, join, write_text

log = get_logger("run")


def _needs_previous_final(job: RunJob, index: int, model: str, what: str) -> None:
    """Refuse to start when ``model`` is the previous round's student and it is not whole where it was saved."""
    if index > 1 and model == previous_final(job, index) and not final_exists(
            Mirror(train_dir(job, index - 1), job.cache.local_dir)):
        raise CacheNotFoundError(f"round {index} needs its {what} {model}; run round {index - 1}'s train stage first")


def _generate_stage(job: RunJob, index: int, num_tasks: int, task_index: int) -> None:
    """Generate round ``index``'s completions: by its teacher, or by its student's starting model (on-policy)."""
    run, settings = run_mirror(job), generate_job(job, index)
    _needs_previous_final(job, index, settings.generate.model, "generating model")
    previous = stage_record(run, index, "generate")
    start = time.perf_counter()
    result = run_generate(settings, num_tasks=num_tasks, task_index=task_index)
    update_stage(run, index, "generate", status="done" if result.complete else "partial",
                 dir=str(result.directory), model=settings.generate.model,
                 by=job_round(job, index)["generate"]["by"], hit=result.hit, score=result.score,
                 seconds=previous.get("seconds", 0.0) + time.perf_counter() - start)
    log.info(f"round {index} generations ({'hit' if result.hit else 'written'}): {result.directory}")


def _cache_stage(job: RunJob, index: int, num_tasks: int, task_index: int) -> None:
    """Cache round ``index``; a teacher that is the previous round's student must be whole where it was saved."""
    run, teacher = run_mirror(job), teacher_of(job, index)
    _needs_previous_final(job, index, teacher, "teacher")
    if "generate" in stages_of(job, index) and stage_record(run, index, "generate").get("status") != "done":
        raise CacheNotFoundError(f"round {index}'s generations are not complete; run its generate stage first")
    previous = stage_record(run, index, "cache")
    start = time.perf_counter()
    result = run_cache(cache_job(job, index), num_tasks=num_tasks, task_index=task_index)
    built = previous.get("built", False) or not result.hit
    cache_json = f"{round_name(index)}/cache.json"
    write_text(run.local / cache_json, json.dumps({"dir": str(result.directory)}) + "\n")
    run.push(cache_json)
    update_stage(run, index, "cache", status="done" if result.complete else "partial",
                 dir=str(result.directory), teacher=teacher, hit=not built, built=built,
                 seconds=previous.get("seconds", 0.0) + time.perf_counter() - start)
    how = "built by this run" if built else "hit: reused an existing cache, no teacher work"
    log.info(f"round {index} cache {how}: {result.directory}")


def _train_stage(job: RunJob, index: int) -> None:
    """Train round ``index``; rank 0 alone records it, as every rank's update would race on another node."""
    run, main = run_mirror(job), world().is_main
    cache = stage_record(run, index, "cache")
    if cache.get("status") != "done":
        raise CacheNotFoundError(f"round {index}'s cache is not complete; run its cache stage first")
    previous = stage_record(run, index, "train")
    start = time.perf_counter()
    try:
        final = train_from_cache(train_job(job, index, cache["dir"]), RoundGroup(run, index, job.round_count()))
    finally:  # preempted attempts count toward the stage's wall time too
        if main:
            update_stage(run, index, "train", seconds=previous.get("seconds", 0.0) + time.perf_counter() - start)
    if main:
        update_stage(run, index, "train", status="done", final=str(final))


def _refuse_another_config(run: Mirror, config_yaml: str) -> None:
    """A run directory that has recorded work keeps its config: a complete stage is skipped, so a changed setting
    would silently be ignored for it and applied to the rest."""
    if not run.pull(CONFIG_NAME) or not read_state(run)["rounds"]:
        return
    diff = changed_settings(result_settings((run.local / CONFIG_NAME).read_text()), result_settings(config_yaml))
    if diff:
        raise ConfigError(f"run.dir {run.name} holds a run of another config ({diff}); continuing would mix two "
                          "configurations: use a new run.dir, or delete this one to start over")


def run_pipeline(job: RunJob, round_index: int | None = None, stage: str | None = None,
                 num_tasks: int = 1, task_index: int = 0) -> Path | str:
    """Run the selected rounds and stages (all by default), skipping complete work; return ``run.dir``."""
    if round_index is not None and not 1 <= round_index <= job.round_count():
        raise ConfigError(f"--round {round_index} is outside 1..{job.round_count()}, the rounds of this run's config")
    run = run_mirror(job)
    run.local.mkdir(parents=True, exist_ok=True)
    run.pull(STATE_NAME)  # what other jobs recorded
    _refuse_another_config(run, to_yaml(job))
    rank = world().rank
    if rank == 0:
        write_text(run.local / CONFIG_NAME, to_yaml(job))
        run.push(CONFIG_NAME)
    rounds = [round_index] if round_index else range(1, job.round_count() + 1)
    if stage in (None, "train"):  # a missing tracker package stops the run now, not after hours of caching
        for index in rounds:
            require_trackers(train_job(job, index, "<cache of this round>").train.report_to)
    for index in rounds:
        if stage == "prepare":  # not a stage of state.json: the cache stage reuses (or rebuilds) the store itself
            log.info(f"round {index}: token store {prepare_tokens(cache_job(job, index))[3].directory}")
            continue
        for name in [stage] if stage else stages_of(job, index):
            if name not in stages_of(job, index):
                log.info(f"round {index} has no {name} stage (no generate section)")
                continue
            if stage_record(run, index, name).get("status") == "done":
                log.info(f"round {index} {name}: complete, skipped")
                continue
            log.info(f"==== round {index}/{job.round_count()}: {name} ====")
            part = f"{task_index}-{rank}" if name != "train" else "0"
            lock = run.local / round_name(index) / f".{name}.{part}.lock"
            if name == "train" and rank != 0:
                _train_stage(job, index)  # torchrun ranks > 0 follow rank 0, which holds the lock
                continue
            with stage_lock(lock):
                if name == "generate":
                    _generate_stage(job, index, num_tasks, task_index)
                elif name == "cache":
                    _cache_stage(job, index, num_tasks, task_index)
                else:
                    _train_stage(job, index)
    return join(job.run.dir)
