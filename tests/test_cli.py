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
            yield prefix + field.name, field


@pytest.mark.parametrize("command,job", [("cache", CacheJob), ("train", TrainJob), ("pretrain", PretrainJob),
                                         ("run", RunJob)])
def test_help_lists_every_key_with_type_default_and_doc(command, job, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for key, field in leaf_fields(job):
        assert f"\n  {key} (" in text, f"`distillery {command} --help` does not list {key}"
    assert "cache.top_k (int, default 64)" in text if command == "cache" else True
    assert "train.lr (float, default 0.001)" in text if command == "train" else True
    assert "Peak learning rate (AdamW)." in text if command in ("train", "pretrain") else True


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
