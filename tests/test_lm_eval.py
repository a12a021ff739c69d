"""``distillery eval``: lm-evaluation-harness on a model folder and on every round of a run, with no network.

The bad inputs that need no monkeypatching (an unknown task, a missing model, a run with nothing trained) are in
``bad_input_cases``.
"""
from __future__ import annotations

import json
import math
import shutil
import socket
import sys
from pathlib import Path

import lm_eval
import pytest
import yaml
from helpers import STUDENT

from pipeline import cli
from pipeline.config_loading import load_config
from pipeline.demo.tokenizer import QA_CORPUS
from pipeline.rounds.config import RunJob
from pipeline.rounds.run import run_pipeline
from pipeline.train.config import PretrainJob
from pipeline.train.run import pretrain

KEYS = {"model", "tasks", "limit", "num_fewshot", "chat_template", "lm_eval_version"}
METRICS = {"acc", "acc_norm", "bits_per_byte"}


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Every TCP connection attempt is recorded and refused (lm-eval swallows some errors, so the record tells)."""
    attempts = []

    def refuse(sock, address):
        attempts.append(address)
        raise ConnectionRefusedError(f"no network in this test: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def scores(final: Path) -> dict:
    """The ``lm_eval.json`` beside ``final``, checked against the schema; its kjv_recitation metrics."""
    written = json.loads((final.parent / "lm_eval.json").read_text())
    assert set(written) == KEYS and written["model"] == str(final), written
    assert written["lm_eval_version"] == lm_eval.__version__ and written["num_fewshot"] is None
    metrics = written["tasks"]["kjv_recitation"]
    assert set(metrics) == METRICS and all(math.isfinite(v) for v in metrics.values()), metrics
    assert 0 <= metrics["acc"] <= 1 and 0 <= metrics["acc_norm"] <= 1 and metrics["bits_per_byte"] > 0
    return written


def evaluate(final: Path, *flags: str) -> dict:
    assert cli.main(["-q", "eval", "--model", str(final), "--tasks", "kjv_recitation", *flags]) == 0
    return scores(final)


def test_eval_scores_a_student_offline_and_training_on_the_verses_scores_better(llama_dir, tmp_path, no_network,
                                                                                 capsys):
    untrained = Path(shutil.copytree(llama_dir, tmp_path / "untrained" / "final"))
    written = evaluate(untrained, "--limit", "16")
    assert written["limit"] == 16 and capsys.readouterr().out.strip() == str(untrained.parent / "lm_eval.json")
    # The same model after some steps on the recitations that the task does not test (its held-out 5 %).
    job = load_config(PretrainJob, None, [
        f"data.path={QA_CORPUS}", "data.format=prompt_response", "data.seq_len=64", "data.holdout_fraction=0.05",
        "data.max_tokens=20000", f"student.model={llama_dir}", f"tokenizer={llama_dir}",
        f"train.out_dir={tmp_path / 'trained'}", "train.steps=40", "train.batch_size=8", "train.lr=0.01",
        "train.warmup_steps=2", "train.eval_every=0", "train.checkpoint_every=0", "device=cpu"])
    trained = Path(pretrain(job))
    better = evaluate(trained, "--limit", "16")["tasks"]["kjv_recitation"]
    worse = written["tasks"]["kjv_recitation"]
    assert better["bits_per_byte"] < worse["bits_per_byte"] - 0.5, (better, worse)
    assert no_network == []


@pytest.fixture(scope="module")
def two_round_run(tmp_path_factory, llama_dir, corpus_jsonl) -> Path:
    """A run of 2 tiny rounds, trained, with no report yet."""
    root = tmp_path_factory.mktemp("eval-run")
    rounds = [{"student": {"config": yaml.safe_load(STUDENT)}}] * 2
    job = load_config(RunJob, None, [
        f"run.dir={root / 'run'}", f"teacher.model={llama_dir}", f"data.path={corpus_jsonl}", "data.seq_len=32",
        "data.holdout_fraction=0.1", f"cache.root={root / 'caches'}", "cache.mode=topk", "cache.top_k=8",
        "train.steps=2", "train.batch_size=4", "train.eval_every=0", "train.checkpoint_every=0", "device=cpu",
        f"rounds={json.dumps(rounds)}"])
    run_pipeline(job)
    return Path(job.run.dir)


def test_eval_of_a_run_scores_every_round_and_rewrites_the_report(two_round_run, no_network, capsys):
    assert cli.main(["-q", "eval", "--run", str(two_round_run), "--limit", "4"]) == 0
    finals = [two_round_run / f"round-{i}" / "train" / "final" for i in (1, 2)]
    assert capsys.readouterr().out.split() == [str(f.parent / "lm_eval.json") for f in finals]
    assert all(scores(final)["limit"] == 4 for final in finals)
    assert "kjv_recitation" in (two_round_run / "report.md").read_text()  # rewritten after the scores
    assert no_network == []


def test_eval_without_the_extra_is_one_line_naming_it(llama_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed: importing it raises ImportError
    assert cli.main(["-q", "eval", "--model", str(llama_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'distillery[eval]'" in err, err


HUB_TASK = """task: hub_hellaswag
dataset_path: Rowan/hellaswag
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{ctx}}"
doc_to_target: "{{label}}"
doc_to_choice: "{{endings}}"
"""
"""A task of the Hugging Face Hub, given as a YAML file: the same download as lm-eval's own ``hellaswag``, without
indexing lm-eval's thousands of task files (seconds; ``bad_input_cases`` does it once for an unknown name)."""


def test_a_hub_task_without_network_is_one_line(llama_dir, tmp_path, monkeypatch, capsys):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")  # nothing cached
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    final = Path(shutil.copytree(llama_dir, tmp_path / "final"))
    task = tmp_path / "hub_hellaswag.yaml"
    task.write_text(HUB_TASK)
    assert cli.main(["-q", "eval", "--model", str(final), "--tasks", str(task)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--tasks {task}: this task needs network" in err, err
    assert not (tmp_path / "lm_eval.json").exists()
