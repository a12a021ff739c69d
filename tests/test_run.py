"""Stage 3: a 2-round run end to end, cache reuse, preemption and resume, locks, status, report, Slurm."""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline import cli, preempt
from pipeline.demo.tokenizer import QA_CORPUS
from pipeline.rounds.slurm import render
from pipeline.rounds.state import LockHeldError, stage_lock
from pipeline.train import recipe as train_module
from pipeline.train.evaluate import score_against_teacher

STUDENT_A = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 2}
STUDENT_B = {**STUDENT_A, "hidden_size": 16, "num_hidden_layers": 1}


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    with gzip.open(QA_CORPUS, "rt") as source:
        lines = [next(source) for _ in range(60)]
    path.write_text("".join(lines))
    return path


def write_config(path: Path, run_dir: Path, cache_root: Path, teacher: Path, data: Path, chat: Path) -> Path:
    config = {
        "run": {"dir": str(run_dir)},
        "teacher": {"model": str(teacher)},
        "data": {"path": str(data), "seq_len": 32, "holdout_fraction": 0.1},
        "cache": {"root": str(cache_root), "mode": "sample", "samples": 16, "shard_size": 8},
        "train": {"steps": 8, "batch_size": 4, "checkpoint_every": 3, "eval_every": 0, "log_every": 1,
                  "warmup_steps": 1, "lr": 0.005},
        "loss": {"kind": "forward_kl"},
        "rounds": [
            {"student": {"config": STUDENT_A}},
            {"student": {"config": STUDENT_B}, "train": {"steps": 6},
             "data": {"path": str(chat), "format": "chat", "seq_len": 64, "holdout_fraction": 0.2}},
        ],
        "device": "cpu",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, llama_dir, corpus_jsonl, chat_data):
    root = tmp_path_factory.mktemp("runs")
    config = write_config(root / "run.yaml", root / "run", root / "caches", llama_dir, corpus_jsonl, chat_data)
    assert cli.main(["run", "--config", str(config)]) == 0
    return root, config


def finals_equal(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def held_out_kl(student_dir: Path, teacher_dir: Path, cache_dir: Path) -> float:
    """Full-vocabulary KL(teacher || student) per loss-mask token of a cache's eval split, from the models' own
    forward passes (not Distillery's chunked head)."""
    from transformers import AutoModelForCausalLM

    from storage.manifest import read_manifest
    from storage.read.reader import sequential_batches

    student = AutoModelForCausalLM.from_pretrained(str(student_dir)).eval()
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    vocab = read_manifest(cache_dir).tokenizer_length
    total = tokens = 0.0
    with torch.no_grad():
        for batch in sequential_batches(cache_dir, "eval", 16):
            s = torch.log_softmax(student(batch["input_ids"]).logits[..., :vocab].float(), -1)
            t = torch.log_softmax(teacher(batch["input_ids"]).logits[..., :vocab].float(), -1)
            mask = batch["loss_mask"]
            total += float(((t.exp() * (t - s)).sum(-1) * mask).sum())
            tokens += float(mask.sum())
    return total / tokens


def test_two_round_run_writes_exactly_its_files(first_run, llama_dir):
    root, _ = first_run
    run = root / "run"
    visible = {p.name for p in run.iterdir() if not p.name.startswith(".")}
    assert visible == {"config.yaml", "state.json", "report.md", "report.html", "report.json", "curves.png", "kl.png",
                       "continuations.json", "round-1", "round-2"}
    assert not list(run.rglob(".*.lock")) or [p.name for p in run.rglob(".*.lock")] == [".state.lock"]
    for index in (1, 2):
        assert {p.name for p in (run / f"round-{index}").iterdir()} == {"cache.json", "train"}
        assert {p.name for p in (run / f"round-{index}" / "train").iterdir()} == {
            ".lock", "checkpoints", "config.yaml", "final", "metrics.jsonl"}
    state = json.loads((run / "state.json").read_text())["rounds"]
    assert all(state[r][s]["status"] == "done" for r in ("1", "2") for s in ("cache", "train"))
    assert state["1"]["cache"]["built"] and state["2"]["cache"]["teacher"].endswith("round-1/train/final")
    report = (run / "report.md").read_text()
    assert report.count("\n| 1 |") == 1 and report.count("\n| 2 |") == 1 and "![kl.png](kl.png)" in report
    rows = json.loads((run / "report.json").read_text())
    assert rows[1]["student params"] < rows[0]["student params"]
    assert rows[0]["task chrF"] is None and 0 <= rows[1]["task chrF"] <= 1  # round 1 is text: no references
    finals = [run / f"round-{i}" / "train" / "final" for i in (1, 2)]
    caches = [Path(json.loads((run / f"round-{i}" / "cache.json").read_text())["dir"]) for i in (1, 2)]
    for row, final, cache_dir in zip(rows, finals, caches, strict=True):
        assert row["KL to original"] == pytest.approx(score_against_teacher(final, llama_dir, cache_dir)["kl"], rel=1e-6)
        assert row["KL to original"] == pytest.approx(held_out_kl(final, llama_dir, cache_dir), rel=1e-5)
    # Round 2's own teacher is round 1's student: its KL to it is not its KL to the original teacher.
    to_round_1 = held_out_kl(finals[1], finals[0], caches[1])
    assert rows[1]["KL to teacher"] == pytest.approx(to_round_1, rel=1e-5)
    assert abs(rows[1]["KL to teacher"] - rows[1]["KL to original"]) > 0.05 * rows[1]["KL to original"]


def test_chat_round_trains_on_assistant_tokens(first_run):
    root, _ = first_run
    cache_dir = Path(json.loads((root / "run" / "round-2" / "cache.json").read_text())["dir"])
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["dataset"]["format"] == "chat"
    from storage.read.reader import sequential_batches

    batch = next(sequential_batches(cache_dir, "train", 4))
    assert 0.2 < batch["loss_mask"].float().mean() < 0.9


def same_config_in(config: Path, run_dir: Path) -> Path:
    """A copy of a run config that writes to ``run_dir``."""
    data = yaml.safe_load(config.read_text())
    data["run"]["dir"] = str(run_dir)
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(data))
    return path


def test_second_experiment_reuses_caches_without_teacher_work(first_run, tmp_path, monkeypatch, capfd):
    root, config = first_run
    again = same_config_in(config, tmp_path / "again")

    def no_teacher(*args, **kwargs):
        raise AssertionError("a teacher was loaded although its cache exists")

    monkeypatch.setattr("pipeline.cache.teacher_pass.load_model", no_teacher)
    assert cli.main(["run", "--config", str(again)]) == 0
    state = json.loads((tmp_path / "again" / "state.json").read_text())["rounds"]
    assert state["1"]["cache"]["hit"] and state["2"]["cache"]["hit"]
    assert "hit: reused an existing cache" in capfd.readouterr().err
    assert finals_equal(tmp_path / "again" / "round-2" / "train" / "final", root / "run" / "round-2" / "train" / "final")


def test_signal_mid_train_then_resume_gives_the_same_result(first_run, tmp_path, monkeypatch, capsys):
    root, config = first_run
    cfg = same_config_in(config, tmp_path / "preempted")
    original = train_module.MetricsLog.write

    def signal_at_step_5(self, record):
        original(self, record)
        if record["step"] == 5 and record["type"] == "train":
            os.kill(os.getpid(), signal.SIGTERM)  # what Slurm sends before a preemption

    monkeypatch.setattr(train_module.MetricsLog, "write", signal_at_step_5)
    try:
        assert cli.main(["run", "--config", str(cfg)]) == preempt.PREEMPTED_EXIT
    finally:
        preempt.clear()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    monkeypatch.setattr(train_module.MetricsLog, "write", original)
    run = tmp_path / "preempted"
    assert (run / "round-1" / "train" / "checkpoints" / "step-00000005").is_dir()
    assert cli.main(["status", str(run)]) == 0
    status = capsys.readouterr().out
    assert "round 1 cache done (hit)" in status and "round 1 train pending" in status
    assert cli.main(["run", "--config", str(cfg)]) == 0
    assert finals_equal(run / "round-2" / "train" / "final", root / "run" / "round-2" / "train" / "final")


def test_a_signal_after_the_last_stage_stops_before_the_report(first_run, tmp_path):
    root, config = first_run
    cfg = same_config_in(config, tmp_path / "late")
    assert cli.main(["run", "--config", str(cfg)]) == 0
    (tmp_path / "late" / "report.md").unlink()
    preempt._requested.set()  # as the handler does when the signal comes during the last stage
    try:
        assert cli.main(["run", "--config", str(cfg)]) == preempt.PREEMPTED_EXIT
    finally:
        preempt.clear()
    assert not (tmp_path / "late" / "report.md").exists()
    assert cli.main(["run", "--config", str(cfg)]) == 0 and (tmp_path / "late" / "report.md").is_file()


def test_stage_one_stops_on_a_real_signal_and_resumes(tmp_path, llama_dir, corpus_jsonl):
    """A separate `distillery cache` process signals itself after its first shard, exits 75, then resumes."""
    from helpers import cache, cache_args

    reference = cache(cache_args(llama_dir, corpus_jsonl, tmp_path / "reference")).directory
    args = cache_args(llama_dir, corpus_jsonl, tmp_path / "cache")
    script = (
        "import os, signal, sys\n"
        "from pipeline import cli\n"
        "from storage.write.cache import CacheDirectory\n"
        "original = CacheDirectory.write_shard\n"
        "def write(self, plan, *args):\n"
        "    original(self, plan, *args)\n"
        "    if plan.index == 1: os.kill(os.getpid(), signal.SIGUSR1)\n"
        "CacheDirectory.write_shard = write\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stopped = subprocess.run([sys.executable, "-c", script, "cache", *args], capture_output=True, text=True, env=env)
    assert stopped.returncode == preempt.PREEMPTED_EXIT, stopped.stderr[-2000:]
    assert "preempted" in stopped.stderr and not (tmp_path / "cache" / "manifest.json").exists()
    written = len(list((tmp_path / "cache").glob("*.done.json")))
    assert written >= 2
    resumed = cache(args)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert resumed.shards_written == len(manifest["shards"]) - written
    reference_hashes = [s["sha256"] for s in json.loads((reference / "manifest.json").read_text())["shards"]]
    assert [s["sha256"] for s in manifest["shards"]] == reference_hashes


def test_stage_lock_names_its_holder_and_takes_over_stale_locks(tmp_path):
    lock = tmp_path / ".train.0.lock"
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid(), "started": "earlier"}))
    with pytest.raises(LockHeldError, match=f"held by pid {os.getpid()}"):
        with stage_lock(lock):
            pass
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout), "started": "earlier"}))
    with stage_lock(lock):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_slurm_templates_render_to_valid_bash(tmp_path, first_run):
    _, config = first_run
    paths = render(str(config), 2, 4, tmp_path / "slurm", str(tmp_path / "run"), gpus=2)
    assert [p.name for p in paths] == ["prepare.sbatch", "cache_array.sbatch", "train.sbatch", "submit.sh"]
    for path in paths:
        text = path.read_text()
        assert "${ROUND}" not in text and "${CONFIG}" not in text
        check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
    assert "--round 2 --stage prepare" in paths[0].read_text()
    array = paths[1].read_text()
    assert "#SBATCH --array=0-3" in array and "--round 2 --stage cache" in array and "-eq 75" in array
    assert "--nproc_per_node 2" in paths[2].read_text()
    submit = paths[3].read_text()
    assert submit.index("prepare.sbatch") < submit.index('afterok:"$prepare_job" "') < submit.index("cache_array")


def test_a_run_dir_with_recorded_work_refuses_another_config(first_run, capfd):
    root, config = first_run
    before = (root / "run" / "config.yaml").read_text()
    changed = root / "changed.yaml"
    data = yaml.safe_load(config.read_text())
    data["train"]["lr"] = 0.5
    changed.write_text(yaml.safe_dump(data))
    capfd.readouterr()
    assert cli.main(["run", "--config", str(changed)]) == 2
    error = [line for line in capfd.readouterr().err.splitlines() if "error" in line]
    assert len(error) == 1 and f"run.dir {root / 'run'} holds a run of another config" in error[0]
    assert "train.lr" in error[0] and "use a new run.dir" in error[0]
    assert (root / "run" / "config.yaml").read_text() == before
