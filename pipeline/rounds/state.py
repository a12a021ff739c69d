"""The run directory's state file and the locks that keep two processes off one stage.

``state.json`` records each stage of each round (status, cache directory,
cache hit, wall time). It is rewritten atomically under a short ``flock``.
A stage lock is a file created exclusively that names its holder
(host, pid, start time); a lock whose holder process is gone from this host
is stale and is taken over.

For a run directory at a URL, both live in its local working copy: every update downloads ``state.json``,
merges into it and uploads it, but two jobs on two nodes can still overwrite each other's update, and neither
sees the other's stage lock. So a run on object storage needs one scheduler job per stage at a time (a stage
whose record was lost is redone by a rerun: a cache hit, or a training resume).
"""
from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import ConfigError
from storage import Mirror, held, write_text

STATE_NAME = "state.json"


class LockHeldError(RuntimeError):
    """Another live process holds the stage."""


def read_state(run: Mirror) -> dict:
    """The working copy's ``state.json`` (``pull`` it first to see other jobs' updates)."""
    path = run.local / STATE_NAME
    if not path.is_file():
        return {"rounds": {}}
    redo = "delete it to redo every stage (complete caches are reused, training resumes from its checkpoints)"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{run.where(STATE_NAME)} is not valid JSON ({exc}); {redo}") from None
    if not isinstance(state, dict) or not isinstance(state.get("rounds"), dict):
        raise ConfigError(f"{run.where(STATE_NAME)} holds no mapping of rounds; {redo}")
    return state


def update_stage(run: Mirror, round_index: int, stage: str, **fields) -> dict:
    """Merge ``fields`` into the record of one stage and rewrite ``state.json`` atomically (and upload it)."""
    with held(run.local / ".state.lock"):
        run.pull(STATE_NAME)
        state = read_state(run)
        record = state["rounds"].setdefault(str(round_index), {}).setdefault(stage, {})
        record.update(fields)
        write_text(run.local / STATE_NAME, json.dumps(state, indent=2) + "\n")
        run.push(STATE_NAME)
    return record


def stage_record(run: Mirror, round_index: int, stage: str) -> dict:
    return read_state(run)["rounds"].get(str(round_index), {}).get(stage, {})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def stage_lock(path: Path):
    """Hold ``path`` exclusively for the duration of a stage, or raise ``LockHeldError`` naming the holder."""
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1))):
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            raise LockHeldError(
                f"{path} is held by pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}; "
                f"wait for it, or delete the lock file if that process is gone"
            ) from None
        with os.fdopen(fd, "w") as handle:
            json.dump(me, handle)
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
