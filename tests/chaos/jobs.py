"""The three stages as a user runs them, and the checks of their outputs, with plain libraries only.

Each check reads the documented output files (``manifest.json``, shard files,
``metrics.jsonl``, ``state.json``, ``model.safetensors``) and compares them with
an uninterrupted run's.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from harness import partial_files


def distillery(*args: str) -> list[str]:
    """The command line of a Distillery stage, as a user starts it."""
    return [sys.executable, "-m", "pipeline", *args]


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "pipeline", *args]


def checked(command: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command to its end; fail with its output when it does not exit 0."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def timed(command: list[str]) -> float:
    began = time.monotonic()
    checked(command)
    return time.monotonic() - began


STUDENT = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 2}
STUDENT_B = {**STUDENT, "hidden_size": 16}


def cache_overrides(teacher: Path, data: Path, output: Path, backend: str) -> list[str]:
    """A cache of about 120 small shards: a kill at a random time often lands inside a shard write."""
    settings = {"teacher.model": teacher, "data.path": data, "data.seq_len": 128, "data.holdout_fraction": 0.1,
                "cache.dir": output, "cache.format": backend, "cache.shard_size": 4, "cache.batch_size": 4,
                "cache.mode": "topk", "cache.top_k": 8, "device": "cpu"}
    return [f"{k}={v}" for k, v in settings.items()]


def cache_command(teacher: Path, data: Path, backend: str, torchrun_every: int = 0):
    """The stage-1 command for an output directory; every ``torchrun_every``-th launch runs 2 torchrun parts."""
    def command(output: Path, launch: int) -> list[str]:
        overrides = cache_overrides(teacher, data, output, backend)
        if torchrun_every and launch % torchrun_every == torchrun_every - 1:
            return torchrun("cache", *overrides)
        return distillery("cache", *overrides)
    return command


def train_overrides(cache: Path, output: Path) -> list[str]:
    settings = {"cache.dir": cache, "student.config": json.dumps(STUDENT), "train.out_dir": output,
                "train.steps": 40, "train.batch_size": 4, "train.checkpoint_every": 2, "train.eval_every": 10,
                "train.log_every": 1, "train.warmup_steps": 2, "train.chunk_size": 50, "device": "cpu"}
    return [f"{k}={v}" for k, v in settings.items()]


def train_command(cache: Path):
    return lambda output, launch: distillery("train", *train_overrides(cache, output))


def lora_train_command(cache: Path, teacher: Path):
    """The teacher itself adapted with LoRA (merged into ``final/``) by 2 DDP ranks, on ``cache``."""
    lora = ["student.config=null", f"student.model={teacher}", "student.lora={r: 4}", "train.steps=20"]
    return lambda output, launch: torchrun("train", *train_overrides(cache, output), *lora)


def write_run_config(path: Path, run_dir: Path, teacher: Path, data: Path) -> Path:
    """A 2-round ``distillery run``: round 1 compresses the teacher, round 2 compresses round 1's student."""
    config = {
        "run": {"dir": str(run_dir)},
        "teacher": {"model": str(teacher)},
        "data": {"path": str(data), "seq_len": 64, "holdout_fraction": 0.1},
        "cache": {"root": str(run_dir / "caches"), "mode": "sample", "samples": 16, "shard_size": 8},
        "train": {"steps": 12, "batch_size": 4, "checkpoint_every": 3, "eval_every": 0, "log_every": 1,
                  "warmup_steps": 1, "lr": 0.005},
        "loss": {"kind": "forward_kl"},
        "rounds": [{"student": {"config": STUDENT}}, {"student": {"config": STUDENT_B}}],
        "device": "cpu",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def write_on_policy_config(path: Path, run_dir: Path, teacher: Path, student: Path, prompts: Path) -> Path:
    """Two ``on_policy`` rounds: the student writes, the teacher's cache scores it, the student trains on it."""
    config = {
        "run": {"dir": str(run_dir)},
        "teacher": {"model": str(teacher)},
        "data": {"path": str(prompts), "format": "chat", "seq_len": 32, "holdout_fraction": 0.25},
        "cache": {"root": str(run_dir / "caches"), "mode": "sample", "samples": 8, "shard_size": 2},
        "train": {"steps": 6, "batch_size": 2, "checkpoint_every": 2, "eval_every": 0, "log_every": 1,
                  "warmup_steps": 1},
        "loss": {"kind": "reverse_kl"},
        "on_policy": {"rounds": 2, "prompts_per_round": 12, "student": {"model": str(student)},
                      "generate": {"max_new_tokens": 12, "batch_size": 4, "shard_size": 2, "dtype": "fp32"}},
        "device": "cpu",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def on_policy_command(teacher: Path, student: Path, prompts: Path):
    """``distillery run`` of the on-policy config, whose run directory is the output."""
    def command(run_dir: Path, launch: int) -> list[str]:
        config = write_on_policy_config(run_dir.parent / f"{run_dir.name}.yaml", run_dir, teacher, student, prompts)
        return distillery("run", "--config", str(config))
    return command


def run_command(teacher: Path, data: Path):
    """``distillery run`` of the 2-round config, whose run directory is the output."""
    def command(run_dir: Path, launch: int) -> list[str]:
        config = write_run_config(run_dir.parent / f"{run_dir.name}.yaml", run_dir, teacher, data)
        return distillery("run", "--config", str(config))
    return command


def sha256(path: Path) -> str:
    """A file's sha256, or of a directory's files in sorted order (each with its relative path)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() if file != path else b"")
        digest.update(file.read_bytes())
    return digest.hexdigest()


def shard_hashes(cache: Path) -> dict[str, str]:
    """sha256 of every shard the manifest lists, recomputed from the files."""
    manifest = json.loads((cache / "manifest.json").read_text())
    return {record["path"]: sha256(cache / record["path"]) for record in manifest["shards"]}


def check_cache(output: Path, reference: dict[str, str]) -> None:
    """The cache is complete, bitwise the reference, passes ``distillery verify`` and has no partial writes."""
    assert shard_hashes(output) == reference
    checked(distillery("verify", str(output)))
    assert not partial_files(output), partial_files(output)[:5]


def never_complete_by_mistake(cache: Path) -> None:
    """After any kill: either there is no manifest, or every shard it lists is there and verifies."""
    if (cache / "manifest.json").exists():
        checked(distillery("verify", str(cache)))


def metric_steps(out_dir: Path) -> dict[str, list[int]]:
    """The steps of ``metrics.jsonl``'s records, by kind (every line must be valid JSON)."""
    steps: dict[str, list[int]] = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps.setdefault(record["type"], []).append(record["step"])
    return steps


def train_losses(out_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["type"] == "train"]


def check_training(output: Path, reference: Path) -> None:
    """Bitwise the reference's final weights; every step logged once, with the reference's losses."""
    assert sha256(output / "final" / "model.safetensors") == sha256(reference / "final" / "model.safetensors")
    assert metric_steps(output) == metric_steps(reference)
    assert train_losses(output) == train_losses(reference)
    assert not partial_files(output), partial_files(output)[:5]


FINAL_STUDENT = ("round-2", "train", "final", "model.safetensors")


def check_run(run_dir: Path, reference: Path) -> None:
    """Round 2's student is bitwise the reference's, and ``distillery status`` reads the run."""
    assert sha256(run_dir.joinpath(*FINAL_STUDENT)) == sha256(reference.joinpath(*FINAL_STUDENT))
    checked(distillery("status", str(run_dir)))
    assert not partial_files(run_dir), partial_files(run_dir)[:5]


def run_state_is_json(run_dir: Path) -> None:
    """``state.json`` of a run is always whole: absent or valid JSON."""
    path = run_dir / "state.json"
    if path.exists():
        json.loads(path.read_text())
