"""The command line documents itself: every key of every stage appears in its ``--help``."""
from __future__ import annotations

import dataclasses
import typing

import pytest

from pipeline import cli
from pipeline.cache.config import CacheJob
from pipeline.rounds.config import RunJob
from pipeline.train.config import PretrainJob, TrainJob


def leaf_fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            yield from leaf_fields(hints[field.name], f"{prefix}{field.name}.")
        else:
            yield prefix + field.name


@pytest.mark.parametrize("command,job,sample", [
    ("cache", CacheJob, "  cache.top_k (int, default 64)\n      Ids stored per position in ``topk`` mode"),
    ("train", TrainJob, "  train.lr (float, default 0.001)\n      Peak learning rate (AdamW)."),
    ("pretrain", PretrainJob, "  tokenizer (str, default '')\n      Tokenizer folder"),
    ("run", RunJob, "  run.dir (str, default '')\n      Run directory"),
])
def test_help_lists_every_key_with_type_default_and_doc(command, job, sample, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for key in leaf_fields(job):
        assert f"\n  {key} (" in text, f"`distillery {command} --help` does not list {key}"
    assert sample in text


def test_log_prefix_and_verbosity_switches(capfd):
    from pipeline.log import get_logger, set_verbosity

    log = get_logger("cache")
    try:
        set_verbosity(-1)  # --quiet
        log.info("progress")
        log.warning("careful")
        assert capfd.readouterr().err == "[distillery cache] warning: careful\n"
        set_verbosity(0)
        log.info("progress")
        log.debug("detail")
        assert capfd.readouterr().err == "[distillery cache] progress\n"
        set_verbosity(1)  # -v
        log.debug("detail")
        assert capfd.readouterr().err == "[distillery cache] detail\n"
    finally:
        set_verbosity(0)


def test_errors_exit_2_with_one_line(tmp_path, capfd):
    assert cli.main(["-q", "verify", str(tmp_path)]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "no manifest.json in" in err


def test_the_script_catches_preemption_from_the_start_and_ignores_it_once_done(tmp_path):
    """``distillery`` installs its handlers before importing the CLI, and ignores SIGTERM / SIGUSR1 after the work:
    Python restores the default action (terminate) for handled signals at shutdown, so a late signal would
    otherwise turn a finished job's exit status into a death by signal."""
    import subprocess
    import sys

    script = ("import signal, sys\n"
              "import pipeline.__main__ as entry\n"
              "real = entry.preempt.install\n"
              "def install():\n"
              "    real()\n"
              "    print('handlers before the CLI:', 'pipeline.cli' not in sys.modules)\n"
              "entry.preempt.install = install\n"
              "sys.argv = ['distillery', 'verify', sys.argv[1]]\n"
              "code = entry.main()\n"
              "print('ignored after:', all(signal.getsignal(s) is signal.SIG_IGN for s in (signal.SIGTERM, signal.SIGUSR1)))\n"
              "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "missing")], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "handlers before the CLI: True" in done.stdout and "ignored after: True" in done.stdout


@pytest.mark.parametrize("command", [["cache"], ["run", "--config", "x.yaml"]])
def test_the_old_task_flags_still_work_for_one_release_with_a_one_line_warning(command, capsys):
    args = cli.build_parser().parse_args([*command, "--num-shards", "3", "--shard-index", "1"])
    assert (args.num_tasks, args.task_index) == (3, 1)
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == ["warning: --num-shards is deprecated and goes in the next release; use --num-tasks",
                        "warning: --shard-index is deprecated and goes in the next release; use --task-index"]
    args = cli.build_parser().parse_args([*command, "--num-tasks", "4", "--task-index", "2"])
    assert (args.num_tasks, args.task_index) == (4, 2) and capsys.readouterr().err == ""
