"""Experiment trackers (``train.report_to``), offline, each read back with its own library: TensorBoard's
EventAccumulator, MLflow's client on its file store, and W&B's offline ``.wandb`` files (decoded below with W&B's
own protobuf ``Record``: wandb 0.31 ships no Python reader of them)."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import STUDENT, cache, cache_args, train, train_args, train_interrupted_at

from pipeline import cli
from storage.manifest import read_manifest

ALL = "[tensorboard, wandb, mlflow]"


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory, llama_dir, corpus_jsonl):
    return cache(cache_args(llama_dir, corpus_jsonl, tmp_path_factory.mktemp("t") / "c", **{"data.seq_len": 32})).directory


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """W&B offline and quiet; every tracker at its default place, whatever the environment running the tests says."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    for name in ("WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)


def metrics(out_dir: Path, kind: str, field: str) -> list[tuple[int, float]]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r[field]) for r in map(json.loads, lines) if r["type"] == kind]


def tensorboard_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def tensorboard_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in tensorboard_events(folder).Scalars(tag)]


def wandb_records(path: Path):
    """The ``Record`` messages of a ``.wandb`` file: a 7-byte header (``:W&B``, magic 0xBEE1, version), then LevelDB
    log chunks in 32 KiB blocks, each with a CRC-32 of its type byte and data, a length and a type (1 whole record,
    2 first, 3 middle, 4 last part)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    position, pending = 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a chunk header is padding
            position += 32768 - position % 32768
            continue
        crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:
            break
        chunk = data[position + 7 : position + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path} is damaged at byte {position}"
        pending, position = pending + chunk, position + 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_runs(out_dir: Path) -> list[dict]:
    """Each offline attempt's run record and history rows (``step -> {key: value}``), oldest first."""
    attempts = []
    for path in sorted(out_dir.glob("wandb/offline-run-*/run-*.wandb")):
        attempt = {"history": {}}
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "run":
                attempt["run"] = record.run
            elif record.WhichOneof("record_type") == "exit":
                attempt["exit_code"] = record.exit.exit_code
            elif record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                attempt["history"][record.history.step.num] = items
        attempts.append(attempt)
    return attempts


def wandb_series(attempts: list[dict], key: str) -> list[tuple[int, float]]:
    return [(step, row[key]) for attempt in attempts for step, row in attempt["history"].items() if key in row]


def mlflow_client(store: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(store.resolve().as_uri())


def test_three_trackers_hold_metrics_jsonl_step_for_step_across_a_kill(tmp_path, topk_cache, monkeypatch):
    out = tmp_path / "o"
    args = train_args(topk_cache, out, **{"train.report_to": ALL})
    train_interrupted_at(7, args, monkeypatch)  # after step 6 and its evaluation; the last checkpoint is step 4
    first = json.loads((out / "trackers.json").read_text())
    assert first["logged"] == {"train": 6, "eval": 6}
    assert mlflow_client(out / "mlruns").get_run(first["mlflow"]["run_id"]).info.status == "KILLED"
    train(args)
    ids = json.loads((out / "trackers.json").read_text())
    assert {name: ids[name] for name in ("tensorboard", "wandb", "mlflow")} == \
           {name: first[name] for name in ("tensorboard", "wandb", "mlflow")}
    loss, kl = metrics(out, "train", "loss"), metrics(out, "eval", "kl")
    assert [step for step, _ in loss] == list(range(1, 13)) and [step for step, _ in kl] == [6, 12]

    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one folder, a file per attempt
    assert tensorboard_scalars(out / "tensorboard", "train/loss") == [(s, float(np.float32(v))) for s, v in loss]
    assert tensorboard_scalars(out / "tensorboard", "eval/kl") == [(s, float(np.float32(v))) for s, v in kl]
    config_text = tensorboard_events(out / "tensorboard").Tensors("params/config/text_summary")
    assert len(config_text) == 1 and b"report_to" in config_text[0].tensor_proto.string_val[0]

    attempts = wandb_runs(out)
    assert [a["run"].run_id for a in attempts] == [ids["wandb"]["id"]] * 2
    assert [a["exit_code"] for a in attempts] == [1, 0]  # killed, then finished
    assert wandb_series(attempts, "train/loss") == loss and wandb_series(attempts, "eval/kl") == kl
    config = json.loads({u.key: u.value_json for u in attempts[0]["run"].config.update}["distillery"])
    assert config["cache_fingerprint"] == read_manifest(topk_cache).fingerprint

    client = mlflow_client(out / "mlruns")
    run = client.get_run(ids["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and len(client.search_runs([run.info.experiment_id])) == 1
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == loss
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/kl")] == kl
    assert run.data.tags["distillery.cache_fingerprint"] == read_manifest(topk_cache).fingerprint
    assert run.data.params["train.report_to"] == json.dumps(["tensorboard", "wandb", "mlflow"])


@pytest.mark.parametrize("backend", ["tensorboard", "wandb", "mlflow"])
def test_a_missing_tracker_package_exits_2_before_any_step(backend, tmp_path, topk_cache, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, backend, None)  # `import backend` now raises ImportError
    argv = ["-q", "train", *train_args(topk_cache, tmp_path / "o", **{"train.report_to": f"[{backend}]"})]
    assert cli.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"pip install 'distillery[{backend}]'" in lines[0], lines
    assert lines[0].startswith(f"distillery train: error: train.report_to: {backend} ")
    assert not (tmp_path / "o" / "metrics.jsonl").exists() and not (tmp_path / "o" / "checkpoints").exists()


def run_config(tmp_path: Path, teacher: Path, data: Path) -> Path:
    """Two rounds of two steps that report to MLflow and W&B; round 2 keeps round 1's teacher, so its cache is a hit."""
    student = yaml.safe_load(STUDENT)
    config = {"run": {"dir": str(tmp_path / "run")}, "teacher": {"model": str(teacher)},
              "data": {"path": str(data), "seq_len": 32, "holdout_fraction": 0.1},
              "cache": {"root": str(tmp_path / "caches"), "mode": "topk", "top_k": 8}, "device": "cpu",
              "train": {"steps": 2, "batch_size": 4, "eval_every": 0, "log_every": 1, "report_to": ["mlflow", "wandb"]},
              "rounds": [{"student": {"config": student}}, {"student": {"config": student}, "teacher": {"model": str(teacher)}}]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "run.yaml"


def test_a_run_without_a_tracker_package_stops_before_its_first_stage(tmp_path, llama_dir, corpus_jsonl, monkeypatch,
                                                                      capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    assert cli.main(["-q", "run", "--config", str(run_config(tmp_path, llama_dir, corpus_jsonl))]) == 2
    assert "pip install 'distillery[mlflow]'" in capsys.readouterr().err
    assert not (tmp_path / "caches").exists()  # no teacher work was done


def test_run_rounds_are_children_of_one_mlflow_parent_and_one_wandb_group(tmp_path, llama_dir, corpus_jsonl):
    assert cli.main(["run", "--config", str(run_config(tmp_path, llama_dir, corpus_jsonl))]) == 0
    client = mlflow_client(tmp_path / "run" / "mlruns")
    parent = json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"]["parent_run_id"]
    runs = client.search_runs([client.get_run(parent).info.experiment_id], order_by=["attributes.start_time"])
    children = [r for r in runs if r.info.run_id != parent]
    assert [r.data.tags.get("mlflow.parentRunId") for r in children] == [parent, parent]
    assert [r.data.tags["distillery.round"] for r in children] == ["1", "2"]
    assert client.get_run(parent).info.status == "FINISHED"
    for index in (1, 2):
        train_dir = tmp_path / "run" / f"round-{index}" / "train"
        assert not (train_dir / "mlruns").exists()  # the rounds share the run's store
        losses = [(m.step, m.value) for m in client.get_metric_history(children[index - 1].info.run_id, "train/loss")]
        assert losses == metrics(train_dir, "train", "loss")
    groups = {a["run"].run_group for i in (1, 2) for a in wandb_runs(tmp_path / "run" / f"round-{i}" / "train")}
    assert len(groups) == 1 and groups.pop().startswith("run-")


def test_an_s3_out_dir_keeps_trackers_in_its_local_copy_and_a_requeue_continues_the_run(bucket, tmp_path, topk_cache,
                                                                                        monkeypatch):
    from storage import Mirror
    from storage.remote import fs as remote

    url, nodes = f"{bucket}/out", [tmp_path / "node-1", tmp_path / "node-2"]
    settings = {"train.report_to": "[tensorboard, wandb]", "train.steps": 4, "train.checkpoint_every": 2,
                "train.eval_every": 0}
    train_interrupted_at(3, train_args(topk_cache, url, **settings, **{"cache.local_dir": nodes[0]}), monkeypatch)
    train(train_args(topk_cache, url, **settings, **{"cache.local_dir": nodes[1]}))  # requeued on another node
    fs, root = remote.open_fs(url)
    uploaded = {key[len(root):].lstrip("/") for key in fs.find(root)}
    assert "trackers.json" in uploaded and not [k for k in uploaded if k.startswith(("tensorboard/", "wandb/"))]
    copies = [Mirror(url, node).local for node in nodes]
    attempts = [*wandb_runs(copies[0]), *wandb_runs(copies[1])]
    assert len(attempts) == 2 and attempts[0]["run"].run_id == attempts[1]["run"].run_id
    loss = metrics(copies[1], "train", "loss")
    assert [step for step, _ in loss] == [1, 2, 3, 4] and wandb_series(attempts, "train/loss") == loss
    assert tensorboard_scalars(copies[1] / "tensorboard", "train/loss") == [(s, float(np.float32(v))) for s, v in loss[2:]]


def test_only_rank_0_of_two_ddp_ranks_logs(tmp_path, topk_cache):
    out = tmp_path / "o"
    args = train_args(topk_cache, out, **{"train.report_to": "[tensorboard]", "train.steps": 2,
                                           "train.checkpoint_every": 0, "train.eval_every": 0})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "pipeline.cli", "train", *args]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 1 opened no writer
    loss = metrics(out, "train", "loss")
    assert tensorboard_scalars(out / "tensorboard", "train/loss") == [(s, float(np.float32(v))) for s, v in loss]
