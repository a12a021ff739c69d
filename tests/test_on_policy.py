"""On-policy rounds as staged jobs: the ``on_policy`` shorthand expands into rounds in which the student writes,
the cached teacher scores its completions, and the student trains on them, each round on fresh prompts."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import yaml

from pipeline import cli
from pipeline.config_loading import load_config
from pipeline.demo.init_model import build_model
from pipeline.demo.tokenizer import QA_CORPUS
from pipeline.rounds.config import RunJob, all_rounds
from pipeline.rounds.report import format_status
from storage import read_folder_manifest, read_manifest


@pytest.fixture(scope="module")
def on_policy_run(tmp_path_factory, llama_dir, tokenizer_dir) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("on-policy")
    prompts = root / "qa.jsonl"
    with gzip.open(QA_CORPUS, "rt") as source:
        prompts.write_text("".join(next(source) for _ in range(24)))
    student = build_model(tokenizer_dir, root / "student", arch="llama", hidden=16, layers=1, heads=2,
                          max_positions=256)
    config = {
        "run": {"dir": str(root / "run")},
        "teacher": {"model": str(llama_dir)},
        "data": {"path": str(prompts), "format": "chat", "seq_len": 32, "holdout_fraction": 0.25},
        "cache": {"root": str(root / "caches"), "mode": "sample", "samples": 8, "shard_size": 4},
        "train": {"steps": 3, "batch_size": 2, "checkpoint_every": 0, "eval_every": 0, "log_every": 1,
                  "warmup_steps": 1},
        "loss": {"kind": "reverse_kl"},
        "on_policy": {"rounds": 2, "prompts_per_round": 8, "student": {"model": str(student)},
                      "generate": {"max_new_tokens": 8, "batch_size": 4, "dtype": "fp32"}},
        "device": "cpu",
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["run", "--config", str(path)]) == 0
    return root, path


def test_the_shorthand_expands_into_rounds_that_share_the_teacher_and_take_disjoint_prompts(on_policy_run):
    root, config = on_policy_run
    job = load_config(RunJob, config, [])
    rounds = all_rounds(job)
    assert job.round_count() == 2 and [r["generate"]["first_prompt"] for r in rounds] == [0, 8]
    assert rounds[1]["student"] == {"model": str(root / "run" / "round-1" / "train" / "final")}
    assert len({r["teacher"]["model"] for r in rounds}) == 1


def test_each_round_generates_with_its_student_then_caches_and_trains_on_those_completions(on_policy_run):
    root, _ = on_policy_run
    run = root / "run"
    state = json.loads((run / "state.json").read_text())["rounds"]
    assert all(state[r][stage]["status"] == "done" for r in ("1", "2") for stage in ("generate", "cache", "train"))
    assert state["1"]["generate"]["model"] == str(root / "student")
    assert state["2"]["generate"]["model"] == str(run / "round-1" / "train" / "final")  # the student's own samples
    indices = []
    for r in ("1", "2"):
        generation, _ = read_folder_manifest(run / f"round-{r}" / "generations")
        cache = read_manifest(state[r]["cache"]["dir"])
        assert cache.dataset["generation"]["fingerprint"] == generation["fingerprint"]
        indices.append(generation["config"]["generate"]["first_prompt"])
    assert indices == [0, 8]
    assert (run / "report.md").is_file() and "| 2 |" in (run / "report.md").read_text()
    lines = format_status(run).splitlines()
    assert [line.split()[2] for line in lines[1:]] == ["generate", "cache", "train"] * 2


def test_a_second_run_skips_every_stage(on_policy_run, capfd):
    _, config = on_policy_run
    capfd.readouterr()
    assert cli.main(["run", "--config", str(config)]) == 0
    err = capfd.readouterr().err
    assert err.count("complete, skipped") == 6
