"""Which checkpoint this job resumes from: the newest undamaged one, with the same global batch and settings.

A damaged checkpoint (a file that fails the size or sha256 in its
``state.json``, a ``state.json`` that fails its seal, a file that does not
load) is never used: the next older one is tried, and the warning names both.
A checkpoint records the settings it was trained with. Keys that only change
how a run is observed or spread (logging, evaluation and checkpoint cadence,
DataLoader workers, device, strategy, the split of the global batch into
ranks, micro-batches and accumulation, and where local copies go) may differ
on resume; any other change would silently continue one run under another's
settings, so it is refused.

For a ``train.out_dir`` at a URL, the destination's complete checkpoints (those whose ``state.json``, uploaded
last, is there) are candidates too: one that the local working copy lacks (a requeue on another node, a deleted
working copy) is downloaded when its turn comes, with ``metrics.jsonl``, so that the records continue.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipeline.dist import World, any_rank, barrier, broadcast_text
from pipeline.errors import CheckpointError, ConfigError
from pipeline.log import get_logger
from pipeline.train.checkpoint import (
    CHECKPOINTS,
    STATE_NAME,
    STEP_DIR,
    Checkpoint,
    checkpoint_dirs,
    load_checkpoint,
    open_checkpoint,
)
from pipeline.train.metrics import METRICS_NAME
from storage import Mirror, StreamOrder, remove_path

DAMAGED_SUFFIX = ".damaged"
log = get_logger("train")

FREE_ON_RESUME = {"train.log_every", "train.eval_every", "train.eval_batches", "train.num_workers", "train.strategy",
                  "train.batch_size", "train.grad_accum", "train.checkpoint_every", "train.keep_checkpoints",
                  "train.resume", "train.out_dir", "device", "cache.verify", "cache.local_dir", "cache.local_bytes",
                  "data.num_proc", "data.streaming", "train.report_to"}
"""Keys that may change between a checkpoint and its resume (the global batch is checked on its own)."""


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and name not in ("student.config",):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value, sort_keys=True)
    return flat


def result_settings(config_yaml: str) -> dict[str, str]:
    """Every setting of a resolved job config that changes what training produces, as ``key -> JSON value``."""
    return {k: v for k, v in _flatten(yaml.safe_load(config_yaml)).items() if k not in FREE_ON_RESUME}


def changed_settings(before: dict[str, str], after: dict[str, str]) -> str:
    """``key: old -> new`` for every setting that differs, joined with ``; `` (empty when none does). A key that
    one side lacks counts as null there: a key added to the configs since the checkpoint, left unset, changes
    nothing."""
    changed = sorted(k for k in {*before, *after} if before.get(k, "null") != after.get(k, "null"))
    return "; ".join(f"{k}: {before.get(k, 'unset')} -> {after.get(k, 'unset')}" for k in changed)


def check_resumable(path: Path, state: dict, order: StreamOrder, settings: dict[str, str]) -> None:
    """Refuse a checkpoint from another configuration, or whose global batch differs from this job's."""
    if "global_batch" not in state or "settings" not in state:
        raise ConfigError(f"checkpoint {path} predates elastic resume and settings checks; "
                          "train into a new train.out_dir or set train.resume=never")
    diff = changed_settings(state["settings"], settings)
    if diff:
        raise ConfigError(f"checkpoint {path} was trained with other settings ({diff}); resuming would mix two "
                          "configurations: set train.resume=never to start over, or use a new train.out_dir")
    if state["global_batch"] != order.global_batch:
        raise ConfigError(
            f"checkpoint {path} was trained with a global batch of {state['global_batch']} (batch_size "
            f"{state['batch_size']} x world size {state['world_size']} x grad_accum {state['grad_accum']}), but this job's "
            f"is {order.global_batch} (batch_size {order.batch_size} x world size {order.world_size} x grad_accum "
            f"{order.grad_accum}); keep the product equal, e.g. grad_accum="
            f"{state['global_batch'] / (order.batch_size * order.world_size):g}, or train into a new train.out_dir")


def _open_on_every_rank(path: Path, here: World) -> Checkpoint:
    """``open_checkpoint`` on every rank (rank 0 hashes the files), or ``CheckpointError`` on every rank."""
    try:
        checkpoint, problem = open_checkpoint(path, hash_files=here.is_main), None
    except CheckpointError as exc:
        checkpoint, problem = None, exc
    if any_rank(problem is not None, here):
        raise problem or CheckpointError(f"checkpoint {path} could not be opened on another rank")
    return checkpoint


def _set_aside(damaged: list[Path], here: World) -> None:
    """Rename damaged checkpoints out of the step-NNNNNNNN names, so that pruning never keeps them over good ones."""
    if here.is_main:
        for path in (p for p in damaged if p.is_dir()):  # a download that found nothing left no copy to rename
            aside = path.with_name(path.name + DAMAGED_SUFFIX)
            remove_path(aside)
            path.rename(aside)


def _candidates(out: Mirror, here: World) -> list[str]:
    """Checkpoint names, newest first: the working copy's, and the destination's complete ones (as rank 0 sees
    them, so that every rank tries the same)."""
    names = ""
    if here.is_main:
        local = {p.name for p in checkpoint_dirs(out.local / CHECKPOINTS)}
        held = {n for n in out.names(CHECKPOINTS) if STEP_DIR.match(n) and n not in local
                and out.exists(f"{CHECKPOINTS}/{n}/{STATE_NAME}")}
        names = json.dumps(sorted(local | held, reverse=True))
    return json.loads(broadcast_text(names, here))


def _local_copy(out: Mirror, name: str, here: World) -> bool:
    """Rank 0 downloads the checkpoint ``name`` when only the destination holds it; True when it did."""
    pulled = here.is_main and not (out.local / CHECKPOINTS / name).is_dir()
    if pulled:
        log.info(f"downloading checkpoint {out.where(f'{CHECKPOINTS}/{name}')}")
        out.pull(f"{CHECKPOINTS}/{name}")
    barrier(here)
    return pulled


def resume_checkpoint(out: Mirror, order: StreamOrder, settings: dict[str, str], model, optimizer, scheduler,
                      here: World) -> Checkpoint | None:
    """Load the newest usable checkpoint of ``out`` into the model, optimizer and schedule and return it; None
    when there is none. Damaged ones are skipped with a warning (and renamed ``*.damaged``); when every one is
    damaged, ``CheckpointError`` names them all. A checkpoint of other settings is refused, never skipped."""
    root = out.local / CHECKPOINTS
    candidates = [root / name for name in _candidates(out, here)]
    problems = []
    for index, path in enumerate(candidates):
        pulled = _local_copy(out, path.name, here)
        try:
            checkpoint = _open_on_every_rank(path, here)
            check_resumable(path, checkpoint.state, order, settings)
            load_checkpoint(checkpoint, model, optimizer, scheduler)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        for problem, damaged in zip(problems, candidates[:index], strict=True):
            log.warning(f"{problem}; falling back to the previous complete checkpoint {path} (this one is kept as "
                        f"{damaged.name}{DAMAGED_SUFFIX})")
        _set_aside(candidates[:index], here)
        if pulled:  # the working copy's records may be older than the checkpoint, or gone
            out.pull(METRICS_NAME)
        return checkpoint
    if problems:
        raise CheckpointError(f"no usable checkpoint in {out.where(CHECKPOINTS)}: {'; '.join(problems)}; set "
                              "train.resume=never to start over, or train into a new train.out_dir")
    return None
