"""Preemption: turn SIGTERM / SIGUSR1 into a flag that stages check at safe points.

Slurm sends SIGTERM (or the signal chosen with ``--signal=USR1@120``) before
it kills a job. A stage that sees the flag saves what it can and raises
``Preempted``; the CLI then exits with ``PREEMPTED_EXIT`` (75, EX_TEMPFAIL),
which the sbatch templates requeue on.
"""
from __future__ import annotations

import signal
import threading

PREEMPTED_EXIT = 75
_requested = threading.Event()


class Preempted(Exception):
    """A stage stopped early on a preemption signal; its progress is saved and rerunning resumes it."""


def _handler(signum, frame) -> None:
    _requested.set()


def install(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
    """Route the given signals to the preemption flag (main thread only)."""
    for sig in signals:
        signal.signal(sig, _handler)


def ignore(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
    """Ignore the given signals from now on: for a process whose work is done. Python puts the default action
    (terminate) back for every signal it handles as it shuts down, so a preemption signal that arrives then
    would turn a finished job's exit 0 into a death by signal."""
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def requested() -> bool:
    return _requested.is_set()


def clear() -> None:
    _requested.clear()
