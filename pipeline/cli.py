"""``distillery`` command line: parse arguments and ``key=value`` overrides, then run one stage."""
from __future__ import annotations

import argparse
import json
import sys
import textwrap

from pipeline.bench.commands import add_parsers
from pipeline.cache.config import CacheJob
from pipeline.errors import CheckpointError, ConfigError, DataError, TeacherError
from pipeline.log import get_logger, set_verbosity
from pipeline.rounds.config import RunJob
from pipeline.rounds.state import LockHeldError
from pipeline.train.config import PretrainJob, TrainJob
from storage.errors import CacheError

USER_ERRORS = (CheckpointError, ConfigError, DataError, TeacherError, CacheError, FileNotFoundError, LockHeldError)


def _cache(args) -> int:
    from pipeline.cache.config import CacheJob
    from pipeline.cache.run import run_cache
    from pipeline.config_loading import load_config

    job = load_config(CacheJob, args.config, args.overrides)
    result = run_cache(job, num_tasks=args.num_shards, task_index=args.shard_index, finalize_only=args.finalize)
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
    run_dir = run_pipeline(job, args.round, args.stage, args.num_shards, args.shard_index)
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
    for path in render(args.config, args.round, args.num_shards, args.out, job.run.dir, gpus=args.gpus):
        print(path)
    return 0


def _inspect(args) -> int:
    from storage.inspect import format_summary, read_cache, summarize

    summary = summarize(read_cache(args.directory))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def _verify(args) -> int:
    from storage.inspect import read_cache

    manifest = read_cache(args.directory)
    problems = manifest.verify()
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{len(manifest.shards) - len(problems)}/{len(manifest.shards)} shards verified in {args.directory}")
    return 1 if problems else 0


def _export(args) -> int:
    from pipeline.log import progress_bars
    from storage.export import export_cache

    s = export_cache(args.cache, args.out, args.format, split=args.split, max_sequences=args.max_sequences,
                     start=args.start, overwrite=args.overwrite, progress=progress_bars())
    print(f"exported {s['rows']} sequences ({s['split']} {s['start']}..{s['start'] + s['rows'] - 1}) of {s['cache']} "
          f"to {s['out']}: {s['files']} {s['format']} files, {s['bytes'] / 1e6:.2f} MB")
    return 0


def _tokenizer(args) -> int:
    from pipeline.demo.tokenizer import build_tokenizer

    print(build_tokenizer(args.out, vocab_size=args.vocab_size))
    return 0


def _init_model(args) -> int:
    from pipeline.demo.init_model import build_model

    print(build_model(args.tokenizer, args.out, arch=args.arch, hidden=args.hidden, layers=args.layers,
                      heads=args.heads, max_positions=args.max_positions, seed=args.seed))
    return 0


def _convert_gguf(args) -> int:
    from pipeline.gguf import convert_gguf

    print(convert_gguf(args.model, args.gguf_file, args.out, overwrite=args.overwrite))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distillery", description="Offline knowledge distillation for causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_const", const=1, default=0, dest="verbosity",
                        help="also print debug messages")
    parser.add_argument("-q", "--quiet", action="store_const", const=-1, dest="verbosity",
                        help="print warnings and errors only")
    commands = parser.add_subparsers(dest="command", required=True)

    cache = _stage_parser(commands, "cache", _cache, "run the teacher once and cache its soft targets", CacheJob,
                          "cache.top_k=32")
    cache.add_argument("--num-shards", type=int, default=1, help="number of parallel jobs (e.g. Slurm array size)")
    cache.add_argument("--shard-index", type=int, default=0, help="this job's index in [0, num-shards)")
    cache.add_argument("--finalize", action="store_true", help="only assemble the manifest from finished shards")
    _stage_parser(commands, "prepare", _prepare, "tokenize and pack the data once into the cache's token store "
                  "(before a Slurm array, so its tasks only memory-map it)", CacheJob, "data.seq_len=1024")
    _stage_parser(commands, "train", _train, "train a student on cached soft targets", TrainJob, "train.steps=200")
    _stage_parser(commands, "pretrain", _pretrain, "train a model with cross-entropy on raw text", PretrainJob,
                  "train.steps=200")
    run = _stage_parser(commands, "run", _run, "run a multi-round pipeline (or one stage of one round)", RunJob,
                        "run.dir=runs/x")
    run.add_argument("--round", type=int, help="only this round (1-based)")
    run.add_argument("--stage", choices=["prepare", "cache", "train"],
                     help="only this stage (prepare: the token store of the cache stage)")
    run.add_argument("--num-shards", type=int, default=1, help="parallel cache jobs (Slurm array size)")
    run.add_argument("--shard-index", type=int, default=0, help="this cache job's index")

    for name, handler, text in (("status", _status, "show the state of every round and stage"),
                                ("report", _report, "write report.md and plots for a run")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("run_dir")
        sub.set_defaults(run=handler)

    slurm = commands.add_parser("slurm", help="render sbatch scripts for one round of a run")
    slurm.add_argument("--config", required=True)
    slurm.add_argument("--round", type=int, default=1)
    slurm.add_argument("--num-shards", type=int, default=8, help="cache array tasks")
    slurm.add_argument("--gpus", type=int, default=8, help="GPUs of the training job")
    slurm.add_argument("--out", required=True, help="folder for the scripts and logs")
    slurm.set_defaults(run=_slurm)

    _add_cache_tools(commands)  # inspect, verify, export
    _add_model_tools(commands)  # tokenizer, init-model, convert-gguf
    add_parsers(commands)  # bench and study
    return parser


def _add_cache_tools(commands) -> None:
    """The subcommands that read a finished cache: ``inspect``, ``verify`` and ``export``."""
    inspect = commands.add_parser("inspect", help="summarise a cache")
    inspect.add_argument("directory")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(run=_inspect)
    verify = commands.add_parser("verify", help="re-hash every shard of a cache")
    verify.add_argument("directory")
    verify.set_defaults(run=_verify)
    export = commands.add_parser("export", help="write a cache (or a slice) as a datasets folder or Parquet files",
                                 description="Write a finished cache, or a slice of one split, as a Hugging Face "
                                 "datasets folder (datasets.load_from_disk) or zstd Parquet files, with Axolotl's KD "
                                 "columns (input_ids, labels, target_token_ids, target_logprobs, target_mask ...).")
    export.add_argument("cache", help="the cache directory or URL")
    export.add_argument("--out", required=True, help="a new or empty directory to write")
    export.add_argument("--format", choices=["hf", "parquet"], default="hf",
                        help="hf: a datasets.save_to_disk folder (default); parquet: data-*.parquet files")
    export.add_argument("--split", default="train", help="the split to export (default: train)")
    export.add_argument("--start", type=int, default=0, help="the first sequence, in manifest order (default: 0)")
    export.add_argument("--max-sequences", type=int, help="at most this many sequences (default: all)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    export.set_defaults(run=_export)


def _add_model_tools(commands) -> None:
    """The subcommands that make models and tokenizers: ``tokenizer``, ``init-model`` and ``convert-gguf``."""
    tokenizer = commands.add_parser("tokenizer", help="train the byte-level BPE on the shipped corpus")
    tokenizer.add_argument("--out", required=True)
    tokenizer.add_argument("--vocab-size", type=int, default=8192)
    tokenizer.set_defaults(run=_tokenizer)

    init = commands.add_parser("init-model", help="save a random-initialised model on a local tokenizer")
    init.add_argument("--tokenizer", required=True)
    init.add_argument("--out", required=True)
    init.add_argument("--arch", default="llama", choices=["llama", "gpt2", "gemma2"])
    init.add_argument("--hidden", type=int, default=384)
    init.add_argument("--layers", type=int, default=6)
    init.add_argument("--heads", type=int, default=6)
    init.add_argument("--max-positions", type=int, default=1024)
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(run=_init_model)
    gguf = commands.add_parser("convert-gguf", help="write a GGUF model (dequantised to fp32) and its tokenizer "
                               "as an ordinary save_pretrained folder")
    gguf.add_argument("--model", required=True, help="a .gguf file, or the folder holding it")
    gguf.add_argument("--gguf-file", help="the file's name in the --model folder (needed when it holds several)")
    gguf.add_argument("--out", required=True, help="a new or empty directory to write")
    gguf.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    gguf.set_defaults(run=_convert_gguf)


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
