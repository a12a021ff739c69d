"""Outputs on object storage, against a real S3 API (moto's server on loopback): training into an ``s3://``
``train.out_dir`` uploads what a local one holds and resumes from it on another node, a two-round run on
``s3://`` takes round 2's teacher from round 1's uploaded student, and no credential is written anywhere."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from helpers import cache, cache_args, train, train_args, train_interrupted_at
from safetensors.torch import load_file

from pipeline import cli
from pipeline.models.hf import weights_sha256
from storage.io.atomic import remove_path
from storage.remote import fs as remote
from storage.remote.mirror import local_folder
from storage.remote.store import open_cache

SECRETS = ("testing-key-id", "testing-secret")
"""The credentials of the ``s3_endpoint`` fixture."""
STUDENT_A = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 2}
STUDENT_B = {**STUDENT_A, "hidden_size": 16}


@pytest.fixture(autouse=True)
def temp_dir(tmp_path, monkeypatch) -> Path:
    """The system temp dir, where local copies go by default, inside the test's folder (to grep it too)."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, llama_dir, corpus_jsonl) -> Path:
    return cache(cache_args(llama_dir, corpus_jsonl, tmp_path_factory.mktemp("c") / "c", **{"data.seq_len": 32})).directory


@pytest.fixture(scope="module")
def local_out(tmp_path_factory, small_cache) -> Path:
    """The same training into a local ``train.out_dir``."""
    out = tmp_path_factory.mktemp("local") / "out"
    train(train_args(small_cache, out))
    return out


def keys(url: str) -> set[str]:
    """Every object under ``url``, relative to it."""
    fs, path = remote.open_fs(url)
    return {key[len(path):].lstrip("/") for key in fs.find(path)}


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def evals(records: bytes) -> list[tuple]:
    return [(r["step"], r["kl"]) for r in map(json.loads, records.splitlines()) if r["type"] == "eval"]


def output(capfd, caplog) -> str:
    """What the test printed since the last call, and everything it logged."""
    captured = capfd.readouterr()
    return captured.out + captured.err + caplog.text


def assert_no_credentials(bucket: str, folders: list[Path], printed: str) -> None:
    """Neither the files written locally, nor any object of ``bucket``, nor the output and logs hold a credential."""
    texts = {f"{bucket}/{key}": remote.read_bytes(f"{bucket}/{key}") for key in keys(bucket)}
    texts.update({str(p): p.read_bytes() for folder in folders for p in folder.rglob("*") if p.is_file()})
    texts["output"] = printed.encode()
    assert len(texts) > 20
    leaks = [(name, secret) for name, data in texts.items() for secret in SECRETS if secret.encode() in data]
    assert not leaks


def test_training_into_s3_uploads_what_a_local_out_dir_holds(bucket, small_cache, local_out, tmp_path,
                                                             temp_dir, capfd, caplog):
    url = f"{bucket}/out"
    final = train(train_args(small_cache, url, **{"cache.local_dir": tmp_path / "work"}))
    assert final == f"{url}/final"
    written = {p.relative_to(local_out).as_posix() for p in local_out.rglob("*") if p.is_file()}
    assert keys(url) == written - {".lock"}  # the lock stays in the local working copy
    assert {"config.yaml", "metrics.jsonl", "final/config.json", "final/model.safetensors",
            "checkpoints/step-00000008/state.json", "checkpoints/step-00000012/state.json"} <= keys(url)
    assert {k.split("/")[1] for k in keys(url) if k.startswith("checkpoints/")} == {"step-00000008", "step-00000012"}
    assert same_weights(local_folder(final, tmp_path / "read"), local_out / "final")
    assert_no_credentials(bucket, [tmp_path / "work", tmp_path / "read", temp_dir], output(capfd, caplog))


def test_a_requeue_on_another_node_resumes_from_the_uploads(bucket, small_cache, local_out, tmp_path, temp_dir,
                                                           monkeypatch, capfd, caplog):
    url = f"{bucket}/out"
    node = [tmp_path / f"node-{i}" for i in (1, 2, 3)]
    train_interrupted_at(7, train_args(small_cache, url, **{"cache.local_dir": node[0]}), monkeypatch)
    assert {k for k in keys(url) if k.endswith("state.json")} == {"checkpoints/step-00000004/state.json"}
    remove_path(node[0])  # the job is requeued on another node, which has no working copy

    original = remote.upload_file

    def killed_at_the_last_file(local, destination):
        if destination == f"{url}/final/config.json":
            raise KeyboardInterrupt("killed while uploading final/")
        original(local, destination)

    monkeypatch.setattr(remote, "upload_file", killed_at_the_last_file)
    with pytest.raises(KeyboardInterrupt):
        train(train_args(small_cache, url, **{"cache.local_dir": node[1]}))
    printed = output(capfd, caplog)
    assert f"downloading checkpoint {url}/checkpoints/step-00000004" in printed
    assert "final/model.safetensors" in keys(url) and "final/config.json" not in keys(url)

    monkeypatch.setattr(remote, "upload_file", original)
    remove_path(node[1])  # requeued again: the torn final/ does not count as done, the last checkpoint is fetched
    final = train(train_args(small_cache, url, **{"cache.local_dir": node[2]}))
    assert "final/config.json" in keys(url)
    assert same_weights(local_folder(final, tmp_path / "read"), local_out / "final")
    assert evals(remote.read_bytes(f"{url}/metrics.jsonl")) == evals((local_out / "metrics.jsonl").read_bytes())
    assert_no_credentials(bucket, [*node, tmp_path / "read", temp_dir], printed + output(capfd, caplog))


def run_config(path: Path, bucket: str, teacher: Path, data: Path, work: Path) -> Path:
    config = {
        "run": {"dir": f"{bucket}/run"},
        "teacher": {"model": str(teacher)},
        "data": {"path": str(data), "seq_len": 32, "holdout_fraction": 0.1, "max_tokens": 3000},
        "cache": {"root": f"{bucket}/caches", "local_dir": str(work), "mode": "sample", "samples": 8,
                  "shard_size": 16},
        "train": {"steps": 3, "batch_size": 4, "checkpoint_every": 2, "eval_every": 0, "log_every": 1,
                  "warmup_steps": 1},
        "rounds": [{"student": {"config": STUDENT_A}}, {"student": {"config": STUDENT_B}}],
        "device": "cpu",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_missing_remote_teachers_and_run_dirs_are_named(bucket, tmp_path, llama_dir, corpus_jsonl, capfd):
    config = run_config(tmp_path / "run.yaml", bucket, llama_dir, corpus_jsonl, tmp_path / "work")
    assert cli.main(["run", "--config", str(config), "--round", "2", "--stage", "cache"]) == 2
    error = [line for line in capfd.readouterr().err.splitlines() if "error" in line]
    assert error == [f"distillery run: error: round 2 needs its teacher {bucket}/run/round-1/train/final; "
                     "run round 1's train stage first"]
    for url, why in ((bucket, "it has no config.yaml"), (f"{bucket}/nothing", "it does not exist"),
                     (f"{bucket}/run/config.yaml", "it is a file")):  # the run uploaded its config.yaml first
        assert cli.main(["status", url]) == 2
        assert f"{url} is not a Distillery run directory ({why})" in capfd.readouterr().err
    assert cli.main(["cache", *cache_args(f"{bucket}/no-teacher", corpus_jsonl, tmp_path / "c")]) == 2
    assert f"teacher.model '{bucket}/no-teacher': no such model directory" in capfd.readouterr().err


def test_a_run_on_s3_teaches_round_two_with_round_ones_upload(bucket, tmp_path, temp_dir, llama_dir, corpus_jsonl,
                                                              capfd, caplog):
    config = run_config(tmp_path / "run.yaml", bucket, llama_dir, corpus_jsonl, tmp_path / "work")
    assert cli.main(["run", "--config", str(config)]) == 0
    run = f"{bucket}/run"
    top = {k for k in keys(run) if "/" not in k}
    assert top == {"config.yaml", "state.json", "report.md", "report.html", "report.json", "curves.png", "kl.png",
                   "continuations.json"}
    for index in (1, 2):
        assert {"cache.json", "train/final/config.json", "train/metrics.jsonl"} <= {
            k.split("/", 1)[1] for k in keys(run) if k.startswith(f"round-{index}/")}
    state = json.loads(remote.read_bytes(f"{run}/state.json"))["rounds"]
    assert all(state[r][s]["status"] == "done" for r in ("1", "2") for s in ("cache", "train"))
    assert state["2"]["cache"]["teacher"] == f"{run}/round-1/train/final"
    assert state["1"]["train"]["final"] == f"{run}/round-1/train/final"
    caches = [open_cache(state[r]["cache"]["dir"], tmp_path / "read") for r in ("1", "2")]
    assert all(c.location.startswith(f"{bucket}/caches/") for c in caches)
    student = weights_sha256(local_folder(f"{run}/round-1/train/final", tmp_path / "read"))
    assert caches[0].manifest.teacher["weights_sha256"] == weights_sha256(llama_dir)
    assert caches[1].manifest.teacher["weights_sha256"] == student != weights_sha256(llama_dir)
    assert caches[1].manifest.teacher["name"] == f"{run}/round-1/train/final"
    assert "| 2 | round 1 student |" in remote.read_bytes(f"{run}/report.md").decode()
    assert cli.main(["status", run]) == 0
    printed = output(capfd, caplog)
    assert "round 2 train done" in " ".join(printed.split())
    assert_no_credentials(bucket, [tmp_path / "work", tmp_path / "read", temp_dir], printed)


def test_an_on_policy_run_on_s3_generates_with_round_ones_uploaded_student(bucket, tmp_path, temp_dir, llama_dir,
                                                                            tokenizer_dir):
    import gzip

    from pipeline.demo.init_model import build_model
    from pipeline.demo.tokenizer import QA_CORPUS

    prompts = tmp_path / "qa.jsonl"
    with gzip.open(QA_CORPUS, "rt") as source:
        prompts.write_text("".join(next(source) for _ in range(16)))
    student = build_model(tokenizer_dir, tmp_path / "student", arch="llama", hidden=16, layers=1, heads=2,
                          max_positions=256)
    config = {"run": {"dir": f"{bucket}/op"}, "teacher": {"model": str(llama_dir)},
              "data": {"path": str(prompts), "format": "chat", "seq_len": 32, "holdout_fraction": 0.25},
              "cache": {"root": f"{bucket}/caches", "local_dir": str(tmp_path / "work"), "mode": "topk", "top_k": 4},
              "train": {"steps": 2, "batch_size": 2, "checkpoint_every": 0, "eval_every": 0, "warmup_steps": 1},
              "loss": {"kind": "reverse_kl"},
              "on_policy": {"rounds": 2, "prompts_per_round": 6, "student": {"model": str(student)},
                            "generate": {"max_new_tokens": 6, "batch_size": 6, "dtype": "fp32"}},
              "device": "cpu"}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["run", "--config", str(path)]) == 0
    run = f"{bucket}/op"
    state = json.loads(remote.read_bytes(f"{run}/state.json"))["rounds"]
    assert all(state[r][s]["status"] == "done" for r in ("1", "2") for s in ("generate", "cache", "train"))
    assert state["2"]["generate"]["model"] == f"{run}/round-1/train/final"
    for index in (1, 2):
        manifest = json.loads(remote.read_bytes(f"{run}/round-{index}/generations/manifest.json"))
        assert manifest["rows"] == 6
        assert json.loads(remote.read_bytes(state[str(index)]["cache"]["dir"] + "/manifest.json"))["dataset"][
            "generation"]["fingerprint"] == manifest["fingerprint"]
    assert "| 2 |" in remote.read_bytes(f"{run}/report.md").decode()
