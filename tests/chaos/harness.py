"""Kill sweeps: start a command, end its whole process tree at a random time, start it again, until it finishes.

The harness knows nothing of Distillery's internals. It launches commands as
a user or a scheduler would, in their own session, and signals the whole
process group, as Slurm does for a job step. The caller checks the output
files, with plain libraries, against a run that was never interrupted.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PREEMPTED_EXIT = 75
# Names the product gives to partial writes: atomic temporaries, set-aside old copies and write probes.
PARTIAL_MARKERS = (".tmp-", ".old-", ".write-probe-")
LAUNCH_TIMEOUT_S = 600


def partial_files(directory: Path) -> list[Path]:
    """Leftovers of interrupted writes anywhere under ``directory``."""
    if not directory.exists():
        return []
    return sorted(p for p in directory.rglob("*") if any(m in p.name for m in PARTIAL_MARKERS))


def catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has installed a handler for ``sig`` (Linux: the SigCgt mask of /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask, 16) >> (sig - 1) & 1)


@dataclass
class Launch:
    """One start of a command: when it was signalled (None: it ran to its end), and how it ended."""

    signal_at_s: float | None
    returncode: int
    wall_s: float
    partial_files_after: int


@dataclass
class SweepResult:
    """Every launch of a sweep, grouped in trials: each trial starts from an empty output and ends finished."""

    name: str
    signal_name: str
    planned: int
    trials: list[list[Launch]] = field(default_factory=list)

    @property
    def launches(self) -> list[Launch]:
        return [launch for trial in self.trials for launch in trial]

    @property
    def interrupted(self) -> list[Launch]:
        return [launch for launch in self.launches if launch.signal_at_s is not None]

    def summary(self) -> dict:
        interrupted = self.interrupted
        return {
            "sweep": self.name, "signal": self.signal_name, "interruptions": len(interrupted),
            "trials": len(self.trials), "launches": len(self.launches),
            "interrupted_mid_write": sum(1 for launch in interrupted if launch.partial_files_after),
            "exit_codes": sorted({launch.returncode for launch in interrupted}),
            "signal_times_s": [round(launch.signal_at_s, 2) for launch in interrupted],
        }


class Sweep:
    """Interrupt ``command`` ``planned`` times with ``sig`` at uniform random times in ``[0, horizon_s)``.

    ``horizon_s`` is the wall time of an uninterrupted run. A launch that ends
    before its signal ends its trial (it must exit 0); ``check_trial`` then
    compares the trial's output with the reference, and the next trial
    starts afresh. After the last interruption the command is run to its end.
    ``after_signal`` inspects the output after every interruption.
    """

    def __init__(self, name: str, command: Callable[[Path, int], list[str]], horizon_s: float, seed: str,
                 sig: int = signal.SIGKILL, env: dict | None = None):
        self.name, self.command, self.horizon_s, self.sig = name, command, horizon_s, sig
        self.rng = random.Random(seed)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}

    def _launch(self, output: Path, index: int, log: Path, signal_at: float | None) -> Launch:
        began = time.monotonic()
        with open(log, "ab") as handle:
            handle.write(f"\n== launch {index}, signal at {signal_at}\n".encode())
            handle.flush()
            process = subprocess.Popen(self.command(output, index), stdout=handle, stderr=subprocess.STDOUT,
                                       env=self.env, start_new_session=True)
        if signal_at is not None and self.sig != signal.SIGKILL:
            # Before its handlers are installed a process dies of any signal, as every program does; the
            # random time counts from the moment the handlers are in.
            while process.poll() is None and not catches(process.pid, self.sig):
                time.sleep(0.005)
            began = time.monotonic()
        try:
            process.wait(timeout=signal_at if signal_at is not None else LAUNCH_TIMEOUT_S)
            signal_at = None  # it ended before the signal was due
        except subprocess.TimeoutExpired:
            if signal_at is None:
                raise
            tree = process_tree(process.pid)
            signal_all(tree, self.sig)
            process.wait(timeout=LAUNCH_TIMEOUT_S)
            wait_gone(tree)
        return Launch(signal_at, process.returncode, time.monotonic() - began, len(partial_files(output)))

    def run(self, fresh_output: Callable[[int], Path], check_trial: Callable[[Path, list[Launch]], None],
            planned: int, log: Path, after_signal: Callable[[Path, Launch], None] | None = None) -> SweepResult:
        result = SweepResult(self.name, signal.Signals(self.sig).name, planned)
        while len(result.interrupted) < planned:
            output, trial = fresh_output(len(result.trials)), []
            result.trials.append(trial)
            while True:
                due = self.rng.uniform(0, self.horizon_s) if len(result.interrupted) < planned else None
                launch = self._launch(output, len(result.launches), log, due)
                trial.append(launch)
                if launch.signal_at_s is None:
                    break
                if after_signal is not None:
                    after_signal(output, launch)
            assert trial[-1].returncode == 0, f"{self.name}: the last launch exited {trial[-1].returncode}; see {log}"
            check_trial(output, trial)
        return result


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants. torchrun starts its workers in sessions of their own, so a process group
    would miss them; the parent links of /proc do not."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, queue = [], [pid]
    while queue:
        tree.append(queue.pop())
        queue += children.get(tree[-1], [])
    return tree


def signal_all(pids: list[int], sig: int) -> None:
    """Send ``sig`` to every process of a tree at once, as a scheduler ends a job step."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_gone(pids: list[int], timeout_s: float = 60) -> None:
    """Wait until every process of a tree has exited; ``kill -9`` those that outlive ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            signal_all(pids, signal.SIGKILL)
        time.sleep(0.02)
