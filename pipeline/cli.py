"""``distillery`` command line: parse arguments and ``key=value`` overrides, then run one stage."""
from __future__ import annotations

import argparse
import sys
import textwrap

from pipeline.bench.commands import add_parsers
from pipeline.cache.config import CacheJob
from pipeline.cli_tools import add_cache_tools, add_eval_tool, add_model_tools
from pipeline.errors import CheckpointError, ConfigError, DataError, TeacherError
from pipeline.generate.config import GenerateJob
from pipeline.log import get_logger, set_verbosity
from pipeline.rounds.config import RunJob
from pipeline.rounds.state import LockHeldError
from pipeline.train.config import PretrainJob, TrainJob
from storage import CacheError

USER_ERRORS = (CheckpointError, ConfigError, DataError, TeacherError, CacheError, FileNotFoundError, LockHeldError)


def _cache(args) -> int:
    from pipeline.cache.config import CacheJob
    from pipeline.cache.run import run_cache
    from pipeline.config_loading import load_config

    job = load_config(CacheJob, args.config, args.overrides)
    result = run_cache(job, num_tasks=args.num_tasks, task_index=args.task_index, finalize_only=args.finalize)
    print(result.directory)
    return 0


def _generate(args) -> int:
    from pipeline.config_loading import load_config
    from pipeline.generate.config import GenerateJob
    from pipeline.generate.run import run_generate

    result = run_generate(load_config(GenerateJob, args.config, args.overrides), args.num_tasks, args.task_index)
    print(result.directory)
    return 0


def _prepare(args) -> int:
    from pipeline.cache.config import CacheJob
    from pipeline.cache.plan import prepare_tokens
    from pipeline.config_loading import load_config

    print(prepare_tokens(load_config(CacheJob, args.config, args.overrides))[3].directory)
    return 0


def _train(args) -> int:
    from pipeline.config_loading import load_config
    from pipeline.train.config import TrainJob
    from pipeline.train.run import train_from_cache

    print(train_from_cache(load_config(TrainJob, args.config, args.overrides)))
    return 0


def _pretrain(args) -> int:
    from pipeline.config_loading import load_config
    from pipeline.train.config import PretrainJob
    from pipeline.train.run import pretrain

    print(pretrain(load_config(PretrainJob, args.config, args.overrides)))
    return 0


def _run(args) -> int:
    from pipeline import preempt
    from pipeline.config_loading import load_config
    from pipeline.dist import world
    from pipeline.rounds.config import RunJob
    from pipeline.rounds.report import build_report
    from pipeline.rounds.run import run_pipeline

    job = load_config(RunJob, args.config, args.overrides)
    run_dir = run_pipeline(job, args.round, args.stage, args.num_tasks, args.task_index)
    if preempt.requested():  # the report is one more safe point: the rerun writes it
        raise preempt.Preempted("every stage is complete; stopped before the report (rerun to write it)")
    if args.round is None and args.stage is None and world().is_main:
        report = build_report(run_dir, job.cache.local_dir)
        print(report.read_text())
    print(run_dir)
    return 0


def _status(args) -> int:
    from pipeline.rounds.report import format_status

    print(format_status(args.run_dir))
    return 0


def _report(args) -> int:
    from pipeline.rounds.report import build_report

    report = build_report(args.run_dir)
    print(report.read_text())
    print(report)
    return 0


def _slurm(args) -> int:
    from pipeline.config_loading import load_config
    from pipeline.rounds.config import RunJob
    from pipeline.rounds.slurm import render

    job = load_config(RunJob, args.config, [])
    for path in render(args.config, args.round, args.num_tasks, args.out, job.run.dir, gpus=args.gpus):
        print(path)
    return 0


def keys_help(job_class: type) -> str:
    """The ``--help`` epilog of a stage: every key with its type, default and docstring."""
    from pipeline.config_loading import describe_keys

    lines = ["keys (give them in --config YAML or as key=value overrides):"]
    for key, type_name, default, doc in describe_keys(job_class):
        lines.append(f"  {key} ({type_name}, default {default})")
        lines += [f"      {line}" for line in textwrap.wrap(doc, 96)]
    return "\n".join(lines)


def _stage_parser(commands, name: str, handler, text: str, job_class: type, example: str):
    stage = commands.add_parser(name, help=text, description=text, epilog=keys_help(job_class),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    stage.add_argument("--config", help="YAML config file (optional)")
    stage.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {example}")
    stage.set_defaults(run=handler)
    return stage


class _Renamed(argparse.Action):
    """A flag's old name, kept for one release: it sets the new flag and says so in one line."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = "--" + self.dest.replace("_", "-")
        print(f"warning: {option_string} is deprecated and goes in the next release; use {new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _task_flags(parser, tasks: int, text: str, index: bool = True) -> None:
    """``--num-tasks`` (and ``--task-index``): Slurm array tasks, each writing its part of a cache."""
    parser.add_argument("--num-tasks", type=int, default=tasks, help=text)
    parser.add_argument("--num-shards", type=int, dest="num_tasks", action=_Renamed, help=argparse.SUPPRESS)
    if index:
        parser.add_argument("--task-index", type=int, default=0, help="this task's index in [0, num-tasks)")
        parser.add_argument("--shard-index", type=int, dest="task_index", action=_Renamed, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distillery", description="Offline knowledge distillation for causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_const", const=1, default=0, dest="verbosity",
                        help="also print debug messages")
    parser.add_argument("-q", "--quiet", action="store_const", const=-1, dest="verbosity",
                        help="print warnings and errors only")
    commands = parser.add_subparsers(dest="command", required=True)

    cache = _stage_parser(commands, "cache", _cache, "run the teacher once and cache its soft targets", CacheJob,
                          "cache.top_k=32")
    _task_flags(cache, 1, "parallel cache jobs (e.g. a Slurm array's size)")
    cache.add_argument("--finalize", action="store_true", help="only assemble the manifest from finished shards")
    generate = _stage_parser(commands, "generate", _generate, "write a model's completions of prompts (sequence-level "
                             "and on-policy distillation)", GenerateJob, "generate.temperature=0")
    _task_flags(generate, 1, "parallel generation jobs (e.g. a Slurm array's size)")
    _stage_parser(commands, "prepare", _prepare, "tokenize and pack the data once into the cache's token store "
                  "(before a Slurm array, so its tasks only memory-map it)", CacheJob, "data.seq_len=1024")
    _stage_parser(commands, "train", _train, "train a student on cached soft targets", TrainJob, "train.steps=200")
    _stage_parser(commands, "pretrain", _pretrain, "train a model with cross-entropy on raw text", PretrainJob,
                  "train.steps=200")
    run = _stage_parser(commands, "run", _run, "run a multi-round pipeline (or one stage of one round)", RunJob,
                        "run.dir=runs/x")
    run.add_argument("--round", type=int, help="only this round (1-based)")
    run.add_argument("--stage", choices=["prepare", "generate", "cache", "train"],
                     help="only this stage (prepare: the token store of the cache stage)")
    _task_flags(run, 1, "parallel cache jobs (e.g. a Slurm array's size)")

    for name, handler, text in (("status", _status, "show the state of every round and stage"),
                                ("report", _report, "write report.md and plots for a run")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("run_dir")
        sub.set_defaults(run=handler)

    slurm = commands.add_parser("slurm", help="render sbatch scripts for one round of a run")
    slurm.add_argument("--config", required=True)
    slurm.add_argument("--round", type=int, default=1)
    _task_flags(slurm, 8, "cache array tasks", index=False)
    slurm.add_argument("--gpus", type=int, default=8, help="GPUs of the training job")
    slurm.add_argument("--out", required=True, help="folder for the scripts and logs")
    slurm.set_defaults(run=_slurm)

    add_cache_tools(commands)  # inspect, verify, export
    add_model_tools(commands)  # tokenizer, init-model, convert-gguf
    add_eval_tool(commands)  # eval (lm-evaluation-harness)
    add_parsers(commands)  # bench and study
    return parser


def one_line(message: str) -> str:
    """An error message on one line (the rule for bad input): the items of a problem list, each on a line of its own
    after ``"  - "``, are joined with ``; ``; any other line break or indent becomes one space."""
    head, *items = (" ".join(part.split()) for part in message.split("\n  - "))
    return " ".join(part for part in (head, "; ".join(items)) if part)


def main(argv: list[str] | None = None) -> int:
    from pipeline import preempt

    args = build_parser().parse_args(argv)
    set_verbosity(args.verbosity)
    preempt.install()
    try:
        return args.run(args)
    except preempt.Preempted as exc:
        get_logger(args.command).warning(f"preempted: {exc}")
        return preempt.PREEMPTED_EXIT
    except USER_ERRORS as exc:
        print(f"distillery {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
