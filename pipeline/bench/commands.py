"""The ``distillery bench`` and ``distillery study`` subcommands: their arguments, and handlers that import the
benchmark code only when run."""
from __future__ import annotations

import importlib
from pathlib import Path


def _bench(args) -> int:
    from pipeline.bench.run import run_bench

    print(run_bench(args.out, quick=args.quick, teacher=args.teacher))
    return 0


def _study(args) -> int:
    from pipeline.bench.study import default_work, help_study, run_study, teacher_facts

    for teacher in args.help_with:
        teacher_facts(Path(teacher).resolve())  # a wrong folder fails now, not after this process's own study
    work = args.work or default_work(args.out)
    print(run_study(args.out, args.teacher, quick=args.quick, scale=args.scale, work=work))
    if args.help_with:
        help_study(args.help_with, quick=args.quick, scale=args.scale, work=work)
    return 0


def _study_of(module: str, function: str):
    """The handler of a study with one teacher: ``function(out, work, teacher, quick=, device=)`` of ``module``."""
    def run(args) -> int:
        study = getattr(importlib.import_module(module), function)
        work = Path(args.work or f"{args.out}-work")
        print(study(Path(args.out), work, Path(args.teacher), quick=args.quick, device=args.device))
        return 0

    return run


def _add_study(commands, name: str, help: str, outputs: str, teacher: str, work: str, run) -> None:
    parser = commands.add_parser(name, help=help)
    parser.add_argument("--out", required=True, help=f"output directory: {outputs}")
    parser.add_argument("--teacher", required=True, help=teacher)
    parser.add_argument("--work", help=f"{work}, kept so that a rerun continues (default: <out>-work)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, not a result")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.set_defaults(run=run)


def add_parsers(commands) -> None:
    """Add ``bench``, ``study``, ``study-on-policy`` and ``study-cross-tokenizer`` to the CLI's subparsers."""
    bench = commands.add_parser("bench", help="run the benchmarks; write results.json and results.md")
    bench.add_argument("--out", required=True, help="output directory")
    bench.add_argument("--quick", action="store_true", help="tiny smoke run, not a timing")
    bench.add_argument("--teacher", help="pretrained teacher folder for the storage and quality sections "
                                         "(`make bench` passes the demo teacher)")
    bench.set_defaults(run=_bench)
    study = commands.add_parser("study", help="distillation quality at realistic length (`make study`): "
                                "results.json, results.md and two plots")
    study.add_argument("--out", required=True, help="output directory: results and plots only")
    study.add_argument("--teacher", action="append", default=[], help="a teacher folder; repeat for several")
    study.add_argument("--quick", action="store_true", help="tiny smoke run, not a result (a random teacher "
                                                            "without --teacher)")
    study.add_argument("--scale", type=float, default=1.0, help="steps and data x this, e.g. 0.5 for about "
                                                                "half the time (the issue asks for 1.0: 1,000 steps)")
    study.add_argument("--work", help="caches and runs, kept so that a rerun continues (default: <out>-work)")
    study.add_argument("--help-with", action="append", default=[], metavar="TEACHER",
                       help="after this study, train the runs of this teacher's study (repeatable) that no other "
                            "process has claimed, in the same --work; its own `distillery study` reports them")
    study.set_defaults(run=_study)
    _add_study(commands, "study-on-policy", "does staged on-policy distillation correct errors? six arms on the "
               "verse recitations (`make study-on-policy`)", "results.json, results.md and a plot",
               "the demo teacher folder, fine-tuned first on the task", "teacher, students, caches and runs",
               _study_of("pipeline.bench.on_policy_study", "run_on_policy_study"))
    _add_study(commands, "study-cross-tokenizer", "one SmolLM2 cache, students of three tokenizers: CE, uld, gold and "
               "same-tokenizer KD in bits per byte (`make study-cross-tokenizer`)", "results.json and results.md",
               "the teacher folder (SmolLM2: `make real-teacher`)", "tokenizers, the cache and the runs",
               _study_of("pipeline.bench.cross_tokenizer_study", "run_cross_tokenizer_study"))
