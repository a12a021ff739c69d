"""``distillery eval``: score students with EleutherAI's lm-evaluation-harness, offline by default.

The run report compares a student with its teacher (KL, top-1) and scores it on the run's own data; lm-eval's
tasks say what the student can do in terms anyone can compare with published models. The scores of a model go
into ``lm_eval.json`` beside its ``final/`` folder (its round's ``train.out_dir``), where the run report finds them.

Only what the user names is read or written, besides the package's own task (``tasks/``, which needs no network
and no datasets cache). A hub task (MMLU, HellaSwag, ...) downloads its dataset through ``datasets`` into the
Hugging Face cache, as lm-eval always does; without a network it fails in one line.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config_loading import device_problem, need, raise_problems
from pipeline.errors import ConfigError, DataError
from pipeline.log import get_logger
from pipeline.models.device import resolve_device
from pipeline.rounds.config import all_rounds, train_dir
from pipeline.rounds.report import build_report, read_run
from pipeline.rounds.report_lm_eval import LM_EVAL_NAME
from storage import Mirror, is_url, write_json

log = get_logger("eval")

INSTALL = "pip install 'distillery[eval]'"
LOCAL_TASKS = Path(__file__).parent / "tasks"
"""The tasks shipped with the package (``kjv_recitation``); lm-eval reads every YAML file here."""


@dataclass
class EvalSettings:
    tasks: list[str] = field(default_factory=lambda: ["kjv_recitation"])
    """lm-eval task, group or tag names: the shipped ``kjv_recitation``, or any of lm-eval's own (``mmlu``,
    ``hellaswag``, ...), whose datasets come from the Hugging Face Hub; or the path of a task's YAML file."""
    limit: int | None = None
    """Score only the first ``limit`` documents of each task (all when None)."""
    num_fewshot: int | None = None
    """Examples shown before each question; None: the task's own default (0 for ``kjv_recitation``)."""
    batch_size: int = 8
    """Requests (context and continuation) scored together."""
    device: str = "cpu"
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto``."""
    chat_template: bool = False
    """Render each question as a user turn with the model's chat template, and score the answer as the assistant's
    turn (for students trained on ``data.format: chat``)."""

    def __post_init__(self):  # the keys are the flags of `distillery eval`
        raise_problems(need(bool(self.tasks) and all(self.tasks), "--tasks", f"names no task: {self.tasks!r}"),
                       need(self.limit is None or self.limit >= 1, "--limit", f"must be >= 1, got {self.limit}"),
                       need(self.num_fewshot is None or self.num_fewshot >= 0, "--num-fewshot",
                            f"must be >= 0, got {self.num_fewshot}"),
                       need(self.batch_size >= 1, "--batch-size", f"must be >= 1, got {self.batch_size}"),
                       need(device_problem(self.device) is None, "--device",
                            f"must be cpu, cuda, cuda:N or auto, got {self.device!r}"))


class _DropCustomDatasetHint(logging.Filter):
    """lm-eval tells the user of every task with its own data loader how to pass ``--metadata`` to lm-eval's
    console script; a ``distillery eval`` user has no such flag."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


_HINT_FILTER = _DropCustomDatasetHint()


def lm_eval_module():
    """The ``lm_eval`` package; its absence is one line naming the extra."""
    try:
        import lm_eval
    except ImportError:
        raise ConfigError(f"distillery eval needs lm-evaluation-harness, which is not installed: {INSTALL}") from None
    logging.getLogger("lm_eval.api.task").addFilter(_HINT_FILTER)  # one object: added once, however many calls
    return lm_eval


@functools.cache
def task_manager(with_hub_tasks: bool):
    """lm-eval's index of the shipped tasks, and of lm-eval's own with ``with_hub_tasks`` (indexing its thousands
    of YAML files takes seconds, so a process does it once)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(LOCAL_TASKS), include_defaults=with_hub_tasks)


def checked_manager(names: list[str]):
    """The task index that knows every name in ``names`` (a YAML file needs none); an unknown name is a
    ``ConfigError``."""
    local = task_manager(False)
    if all(name in local.all_tasks or _is_task_file(name) for name in names):
        return local
    manager = task_manager(True)
    unknown = [name for name in names if name not in manager.all_tasks and not _is_task_file(name)]
    if unknown:
        raise ConfigError(f"--tasks: unknown lm-eval task {', '.join(unknown)}; give a name that `lm-eval ls tasks` "
                          f"lists, {', '.join(local.all_tasks)} (shipped), or a task's YAML file")
    return manager


def _is_task_file(name: str) -> bool:
    """Whether ``name`` is a task's own YAML file, which lm-eval loads by its path."""
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


def load_tasks(manager, names: list[str]) -> list:
    """The tasks (and groups, whose scores lm-eval aggregates) that ``names`` stand for, with their data; a hub
    dataset that cannot be downloaded is a ``DataError`` naming the task."""
    items = []
    for name in names:
        try:
            loaded = manager.load([name])
        except ConnectionError as exc:
            raise DataError(f"--tasks {name}: this task needs network: lm-eval downloads its dataset from the Hugging "
                            f"Face Hub, which did not answer ({exc}); run it where the Hub is reachable, or with the "
                            "dataset in the Hugging Face datasets cache") from None
        group = loaded["groups"].get(name)
        items += [group] if group is not None else list(loaded["tasks"].values())
    return items


def metric_values(entries: dict) -> dict[str, float | None]:
    """lm-eval's ``{"acc,none": 0.25, "acc_stderr,none": ..., "alias": ...}`` as ``{"acc": 0.25}``: metrics only,
    no standard errors, the ``,none`` filter suffix removed (other filters keep theirs); null for a value that is
    not a finite number."""
    values = {}
    for key, value in entries.items():
        metric, comma, filter_name = key.partition(",")
        if comma and not metric.endswith("_stderr"):
            number = float(value) if isinstance(value, (int, float)) else math.nan
            values[metric if filter_name == "none" else key] = number if math.isfinite(number) else None
    return values


def scores_path(model: Path) -> Path:
    """Where a model's ``lm_eval.json`` goes: beside a ``final/`` folder (in its ``train.out_dir``), inside any other
    model folder."""
    return model.parent / LM_EVAL_NAME if model.name == "final" else model / LM_EVAL_NAME


def evaluate_model(model: str | Path, settings: EvalSettings) -> Path:
    """Score the ``save_pretrained`` folder ``model`` on ``settings.tasks``; write and return its ``lm_eval.json``."""
    lm_eval, model = lm_eval_module(), Path(model)
    if not (model / "config.json").is_file():
        raise ConfigError(f"--model {model}: not a model folder (no config.json); give a save_pretrained folder, "
                          "e.g. a run's round-N/train/final")
    manager = checked_manager(settings.tasks)
    tasks = load_tasks(manager, settings.tasks)  # before the model: a task that cannot load fails at once
    device = str(resolve_device(settings.device))
    log.info(f"scoring {model} on {', '.join(settings.tasks)} ({device})")
    # An absolute path: lm-eval asks the Hub about anything that looks like a repo id ("student/final").
    results = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(model.resolve())}, tasks=tasks,
                                      task_manager=manager, limit=settings.limit, num_fewshot=settings.num_fewshot,
                                      batch_size=settings.batch_size, device=device, bootstrap_iters=0,
                                      apply_chat_template=settings.chat_template, log_samples=False)
    entries = {**results["results"], **results.get("groups", {})}
    scores = {"model": str(model), "tasks": {task: metric_values(values) for task, values in entries.items()},
              "limit": settings.limit, "num_fewshot": settings.num_fewshot, "chat_template": settings.chat_template,
              "lm_eval_version": lm_eval.__version__}
    for task, values in scores["tasks"].items():
        log.info(f"{task}: " + ", ".join(f"{metric} {value:.4g}" if value is not None else f"{metric} -"
                                         for metric, value in values.items()))
    path = scores_path(model)
    write_json(path, scores)
    return path


def evaluate_run(run_dir: str, settings: EvalSettings) -> list[Path]:
    """Score the ``final/`` of every trained round of the run in ``run_dir``, then rewrite its report."""
    lm_eval_module()
    if is_url(run_dir):
        raise ConfigError(f"--run {run_dir}: distillery eval scores local runs only; copy the run's folder here first")
    job, state = read_run(Mirror(run_dir))
    job.run.dir = run_dir  # the folder named, wherever the run was made: its rounds are inside it
    rounds = range(1, len(all_rounds(job)) + 1)
    finals = [Path(train_dir(job, i), "final") for i in rounds
              if state.get(str(i), {}).get("train", {}).get("status") == "done"]
    if not finals:
        raise ConfigError(f"--run {run_dir}: no round has trained yet, so there is no final/ to score; "
                          "run `distillery run` first")
    written = [evaluate_model(final, settings) for final in finals]
    build_report(run_dir)
    return written
