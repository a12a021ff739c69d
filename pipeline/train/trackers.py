"""Experiment trackers (``train.report_to``): TensorBoard, Weights & Biases and MLflow, each through its own library.

``metrics.jsonl`` stays the record of a run; rank 0 sends each record to the trackers as it is written, every
numeric field as ``train/<field>`` or ``eval/<field>`` at the record's step. A job that resumes from a checkpoint
continues its tracker runs (ids in ``train.out_dir/trackers.json``); the steps a killed attempt trained after its
last checkpoint are trained again, but the trackers already hold them, so each tracker gets each step once. A job
that starts at step 0 starts new tracker runs, as ``metrics.jsonl`` starts over. Under ``distillery run``
(``RoundGroup``) the rounds' runs share a W&B group and an MLflow parent run (its id in ``<run.dir>/trackers.json``).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.errors import ConfigError
from pipeline.log import get_logger
from pipeline.train.metrics import MetricsLog
from storage import Mirror, first_line, is_url, open_cache, remove_path, write_json

TRACKERS_NAME = "trackers.json"
log = get_logger("train")


def require_trackers(names: list[str]) -> None:
    """A one-line ``ConfigError`` naming the extra to install when a tracker's package does not import."""
    for name in names:  # each backend's package has the backend's name
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"train.report_to: {name} does not import ({first_line(exc)}); install it with "
                              f"pip install 'distillery[{name}]'") from None


@dataclass(frozen=True)
class RoundGroup:
    """The ``distillery run`` round that a training job trains; its tracker runs join the run's group."""

    run: Mirror
    """The run directory: ``trackers.json`` there keeps the MLflow parent run, ``mlruns/`` is the default store."""
    index: int
    rounds: int

    @property
    def name(self) -> str:
        """The run directory's name and a hash of where it is, so that two runs both called ``demo`` stay apart."""
        where = self.run.name if is_url(self.run.name) else str(self.run.local.resolve())
        return f"{Path(str(self.run.name).rstrip('/')).name}-{hashlib.sha256(where.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class RunFacts:
    """What every tracker run is named and tagged with: ``tags`` holds ``cache_fingerprint`` and ``teacher`` (of a
    student trained on a cache) and ``round`` (under ``distillery run``)."""

    name: str
    config_yaml: str
    config: dict
    tags: dict
    group: RoundGroup | None


def describe(out: Mirror, config_yaml: str, group: RoundGroup | None) -> RunFacts:
    """The facts of the job whose resolved config is ``config_yaml``, training into ``out`` (as ``group``'s round
    under ``distillery run``)."""
    config, tags = yaml.safe_load(config_yaml), {}
    cache = config.get("cache") or {}
    if cache.get("dir"):
        manifest = open_cache(cache["dir"], cache.get("local_dir")).manifest
        tags = {"cache_fingerprint": manifest.fingerprint, "teacher": manifest.teacher.get("name", "")}
    if group:
        tags["round"] = group.index
    name = f"round-{group.index}" if group else Path(str(out.name).rstrip("/")).name
    return RunFacts(name, config_yaml, config, tags, group)


def _read(path: Path) -> dict:
    """A ``trackers.json``; none, or one that does not parse, is empty (new tracker runs are started)."""
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as exc:
        log.warning(f"{path} does not read ({first_line(exc)}); starting new tracker runs")
        return {}


class TensorBoardRun:
    """Scalars in ``<out_dir>/tensorboard``, through ``torch.utils.tensorboard``: an events file per attempt."""

    def __init__(self, out: Path, facts: RunFacts, saved: dict):
        from torch.utils.tensorboard import SummaryWriter

        folder = out / "tensorboard"
        if not saved:  # a new run: the folder holds this run's events alone, as metrics.jsonl holds its records
            remove_path(folder)
        new = not folder.is_dir()  # or a resume on another node, whose working copy has no events yet
        self.writer = SummaryWriter(str(folder))
        self.ids = {"dir": folder.name}
        if new:
            for key, value in {"config": f"```yaml\n{facts.config_yaml}```", **facts.tags}.items():
                self.writer.add_text(f"params/{key}", str(value), 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, complete: bool) -> None:
        self.writer.close()


class WandbRun:
    """A W&B run: files under ``out_dir`` unless ``WANDB_DIR`` is set, project ``distillery`` unless
    ``WANDB_PROJECT`` is; ``WANDB_MODE=offline`` keeps it on disk for a later ``wandb sync``."""

    def __init__(self, out: Path, facts: RunFacts, saved: dict):
        import wandb

        try:
            self.run = wandb.init(id=saved.get("id"), resume="allow", allow_val_change=True,
                                  dir=None if "WANDB_DIR" in os.environ else str(out),
                                  project=None if "WANDB_PROJECT" in os.environ else "distillery",
                                  name=facts.name, group=facts.group.name if facts.group else None,
                                  config={**facts.config, "distillery": facts.tags})
        except wandb.errors.Error as exc:
            raise ConfigError(f"train.report_to: wandb could not start its run ({first_line(exc)}); log in with "
                              "`wandb login`, or set WANDB_MODE=offline") from None
        self.ids = {"id": self.run.id}

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self, complete: bool) -> None:
        self.run.finish(exit_code=0 if complete else 1)


def _flat(tree: dict, prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.001}}`` as ``{"train.lr": "0.001"}``: a resolved config as MLflow params."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return flat


class MlflowRun:
    """An MLflow run in ``MLFLOW_TRACKING_URI``, or a file store in ``out_dir/mlruns`` (``<run.dir>/mlruns`` under
    ``distillery run``, whose parent run holds it); experiment ``distillery`` unless ``MLFLOW_EXPERIMENT_NAME``."""

    def __init__(self, out: Path, facts: RunFacts, saved: dict):
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.group = facts.group
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # MLflow 3 refuses its file store (in maintenance) unless told; its SQLite store needs SQLAlchemy
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # which mlflow-skinny does not install
            uri = ((self.group.run.local if self.group else out) / "mlruns").resolve().as_uri()
        try:
            self.client = MlflowClient(uri)
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "distillery")
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found else self.client.create_experiment(name)
            self.parent = self._parent(experiment, uri) if self.group else None
            run_id = saved.get("run_id") if saved.get("tracking_uri") == uri else None
            if run_id and not self._exists(run_id):
                log.warning(f"mlflow run {run_id} is gone from {uri}; starting a new one")
                run_id = None
            self.run_id = run_id or self._start(experiment, facts)
            self.client.update_run(self.run_id, status="RUNNING")
        except MlflowException as exc:
            raise ConfigError(f"train.report_to: mlflow could not open a run in {uri} ({first_line(exc)})") from None
        self.ids = {"tracking_uri": uri, "run_id": self.run_id}

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
            return True
        except MlflowException:
            return False

    def _parent(self, experiment: str, uri: str) -> str:
        """The run directory's parent run, created by its first round that reports to this store."""
        run = self.group.run
        if not (run.local / TRACKERS_NAME).is_file():
            run.pull(TRACKERS_NAME)
        saved = _read(run.local / TRACKERS_NAME).get("mlflow", {})
        parent = saved.get("parent_run_id") if saved.get("tracking_uri") == uri else None
        if not (parent and self._exists(parent)):
            parent = self.client.create_run(experiment, run_name=self.group.name,
                                            tags={"distillery.run_dir": str(run.name)}).info.run_id
            write_json(run.local / TRACKERS_NAME, {"mlflow": {"tracking_uri": uri, "parent_run_id": parent}})
            run.push(TRACKERS_NAME)
        self.client.update_run(parent, status="RUNNING")
        return parent

    def _start(self, experiment: str, facts: RunFacts) -> str:
        from mlflow.entities import Param

        tags = {f"distillery.{key}": str(value) for key, value in facts.tags.items()}
        if self.parent:
            tags["mlflow.parentRunId"] = self.parent
        run_id = self.client.create_run(experiment, run_name=facts.name, tags=tags).info.run_id
        params = [Param(key, value) for key, value in _flat(facts.config).items()]
        for start in range(0, len(params), 100):  # MLflow's limit on the params of one call
            self.client.log_batch(run_id, params=params[start : start + 100])
        self.client.log_text(run_id, facts.config_yaml, "config.yaml")
        return run_id

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in values.items()])

    def close(self, complete: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if complete else "KILLED")
        if self.parent and (not complete or self.group.index == self.group.rounds):  # the last round ends the run
            self.client.set_terminated(self.parent, "FINISHED" if complete else "KILLED")


BACKENDS = {"tensorboard": TensorBoardRun, "wandb": WandbRun, "mlflow": MlflowRun}


class Trackers:
    """``metrics.jsonl`` and the trackers of ``train.report_to``: each record goes to the file, then to the trackers."""

    def __init__(self, metrics: MetricsLog, state: Path | None = None, logged: dict | None = None):
        self.metrics, self.state, self.logged, self.backends = metrics, state, logged or {}, {}

    @classmethod
    def open(cls, metrics: MetricsLog, report_to: list[str], out: Mirror, config_yaml: str, resume_step: int,
             is_main: bool, group: RoundGroup | None = None) -> Trackers:
        """Continue the tracker runs of ``out`` when resuming from a checkpoint (``resume_step`` > 0), else start
        new ones; only rank 0 (``is_main``) has any."""
        if not (report_to and is_main):
            return cls(metrics)
        state = out.local / TRACKERS_NAME
        if resume_step and not state.is_file():
            out.pull(TRACKERS_NAME)  # a requeue on another node continues the runs that the destination names
        saved = _read(state) if resume_step else {}
        facts = describe(out, config_yaml, group)
        trackers = cls(metrics, state, saved.get("logged"))
        try:
            for name in report_to:
                trackers.backends[name] = BACKENDS[name](out.local, facts, saved.get(name, {}))
        except BaseException:
            trackers.close(complete=False)
            raise
        trackers.save()
        return trackers

    def write(self, record: dict) -> None:
        """Append ``record`` to ``metrics.jsonl``, then send its numbers to the trackers unless they have its step."""
        self.metrics.write(record)
        kind, step = record["type"], record["step"]
        if not self.backends or step <= self.logged.get(kind, 0):
            return
        values = {f"{kind}/{key}": float(value) for key, value in record.items()
                  if key not in ("type", "step") and isinstance(value, (int, float)) and not isinstance(value, bool)}
        for backend in self.backends.values():
            backend.log(values, step)
        self.logged[kind] = step
        self.save()

    def save(self) -> None:
        write_json(self.state, {**{name: b.ids for name, b in self.backends.items()}, "logged": self.logged})

    def close(self, complete: bool) -> None:
        """End the tracker runs: finished when the student is, else killed (a resume reopens them)."""
        for name, backend in self.backends.items():
            try:
                backend.close(complete)
            except Exception as exc:  # the training's outputs are safe; a tracker that fails to close loses nothing
                log.warning(f"train.report_to: {name} did not close cleanly ({first_line(exc)})")
        self.backends = {}
