"""Bad input exits 2 with one line on stderr naming the key, file or value, no traceback, and nothing complete.

The cases are the table in ``bad_input_cases``.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from bad_input_cases import CASES, Case, Inputs
from helpers import cache, cache_args

from pipeline import cli
from pipeline.config_loading import load_config
from pipeline.rounds.config import RunJob
from pipeline.rounds.run import run_pipeline

MARKERS = ("**/manifest.json", "**/*.done.json", "**/final", "**/checkpoints/step-*")
"""What marks work complete: a cache's manifest and done records, a trained model and its checkpoints."""


def completion_markers(folder: Path) -> set[str]:
    """The completion markers under ``folder``, and every stage that the ``state.json`` of a run in ``folder`` marks
    done."""
    found = {str(p) for pattern in MARKERS for p in folder.glob(pattern)}
    state = folder / "state.json"
    if state.is_file():
        found |= {f"{state}: round {index} {stage}" for index, stages in json.loads(state.read_text())["rounds"].items()
                  for stage, record in stages.items() if record.get("status") == "done"}
    return found


def contents(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` but hidden ones (locks, which a refused job may take and release) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("[!.]*") if p.is_file()}


@pytest.fixture(scope="module")
def shared(tmp_path_factory, llama_dir, corpus_jsonl) -> Inputs:
    """A finished cache and a run directory whose rounds have not run, built once for every case."""
    root = tmp_path_factory.mktemp("bad-input")
    small = {"data.seq_len": 32, "cache.shard_size": 64}
    directory = cache(cache_args(llama_dir, corpus_jsonl, root / "shared-cache", **small)).directory
    run = load_config(RunJob, None, [f"run.dir={root / 'shared-run'}", f"teacher.model={llama_dir}",
                                     f"data.path={corpus_jsonl}", "data.seq_len=32", f"cache.root={root / 'caches'}",
                                     "rounds=[{student: {config: {model_type: llama}}}]"])
    run_pipeline(run, round_index=1, stage="prepare")
    return Inputs(tmp=root, teacher=llama_dir, corpus=corpus_jsonl, cache=directory, run=Path(run.run.dir))


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_exits_2_with_one_line(case: Case, shared: Inputs, tmp_path, capsys):
    inputs = replace(shared, tmp=tmp_path)
    argv = case.argv(inputs)
    complete_before = {name: completion_markers(tmp_path / name) for name in case.outputs}
    contents_before = {name: contents(tmp_path / name) for name in case.untouched}
    capsys.readouterr()  # what building the inputs logged
    assert cli.main(["-q", *map(str, argv)]) == 2  # -q: only warnings and errors, so the error is all there is
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"distillery {argv[0]}: error: "), lines[0]
    missing = [part for part in case.expect if part not in lines[0]]
    assert not missing, f"{lines[0]!r} does not say {missing}"
    assert {name: completion_markers(tmp_path / name) for name in case.outputs} == complete_before
    assert {name: contents(tmp_path / name) for name in case.untouched} == contents_before


def test_the_table_covers_at_least_30_distinct_cases():
    assert len(CASES) >= 30 and len({case.id for case in CASES}) == len(CASES)
