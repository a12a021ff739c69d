"""Cache hits and misses, crash and resume, Slurm-style partitions, torchrun, inspect and verify."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import cache, cache_args, read_all

from pipeline import cli
from storage.errors import FingerprintMismatchError
from storage.manifest import read_manifest
from storage.write.cache import CacheDirectory


def shard_hashes(directory) -> dict[str, str]:
    return {s.path: s.sha256 for s in read_manifest(directory).shards}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, llama_dir, corpus_jsonl):
    """An uninterrupted single-process arrow cache."""
    directory = tmp_path_factory.mktemp("reference") / "cache"
    result = cache(cache_args(llama_dir, corpus_jsonl, directory))
    assert not result.hit and result.shards_written == len(read_manifest(directory).shards)
    return directory


def test_exact_output_files(reference):
    manifest = read_manifest(reference)
    shards = [s.path for s in manifest.shards]
    assert shards[0] == "train-00000.arrow" and manifest.shards_for("eval")[0].path == "eval-00000.arrow"
    expected = {"manifest.json", "fingerprint.json", "config.yaml", "tokenizer", "tokens"}
    expected |= {".manifest.lock", ".part-0-of-1.lock"}  # flock files: two writers of one part or one manifest wait
    expected |= {p for s in shards for p in (s, s + ".done.json")}
    assert {p.name for p in reference.iterdir()} == expected
    assert manifest.splits["train"]["sequences"] + manifest.splits["eval"]["sequences"] == sum(
        s.sequences for s in manifest.shards)
    assert all(dataclasses.asdict(s).keys() == {"path", "split", "sequences", "tokens", "bytes", "sha256"} for s in manifest.shards)


def test_padding_is_masked(reference):
    shards = read_all(reference)
    last_train = [p for p in shards if p.startswith("train")][-1]
    mask = shards[last_train]["loss_mask"]
    assert mask[-1, -1] == 0 and mask[0, 0] == 1  # the final block is padded, the first is not
    assert all(shards[p]["loss_mask"].all() for p in shards if p.startswith("train") and p != last_train)


def test_same_settings_are_a_hit_with_no_teacher_work(reference, llama_dir, corpus_jsonl, monkeypatch, capsys):
    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded on a cache hit")

    monkeypatch.setattr("pipeline.cache.teacher_pass.load_model", no_teacher)
    assert cli.main(["cache", *cache_args(llama_dir, corpus_jsonl, reference)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == str(reference)
    assert "cache hit" in captured.err


def test_cache_root_keys_by_fingerprint(tmp_path, llama_dir, corpus_jsonl):
    args = cache_args(llama_dir, corpus_jsonl, "", **{"cache.root": tmp_path})
    args = [a for a in args if not a.startswith("cache.dir")]
    first = cache(args)
    assert first.directory.parent == tmp_path and first.directory.name == read_manifest(first.directory).fingerprint
    assert cache(args).hit
    other = cache(args + ["cache.top_k=4"])
    assert not other.hit and other.directory != first.directory


def test_different_settings_in_same_dir_fail(reference, llama_dir, corpus_jsonl):
    before = shard_hashes(reference)
    with pytest.raises(FingerprintMismatchError, match="fingerprint"):
        cache(cache_args(llama_dir, corpus_jsonl, reference, **{"cache.top_k": 4}))
    assert shard_hashes(reference) == before


def test_crash_then_resume_equals_uninterrupted(tmp_path, reference, llama_dir, corpus_jsonl, monkeypatch):
    directory = tmp_path / "cache"
    original = CacheDirectory.write_shard
    calls = []

    def crash_on_third(self, plan, backend, arrays, level):
        calls.append(plan.name)
        if len(calls) == 3:
            (directory / f".{plan.name}.tmp-999-dead").write_bytes(b"partial")  # a killed writer's leftover
            raise RuntimeError("simulated crash")
        original(self, plan, backend, arrays, level)

    monkeypatch.setattr(CacheDirectory, "write_shard", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cache(cache_args(llama_dir, corpus_jsonl, directory))
    monkeypatch.setattr(CacheDirectory, "write_shard", original)
    assert not (directory / "manifest.json").exists()
    (directory / "train-00001.arrow").write_bytes(b"corrupted after its record was written")
    for leftover in (".manifest.json.tmp-999-dead", ".fingerprint.json.tmp-999-dead", ".tokenizer.old-999-dead"):
        (directory / leftover).write_bytes(b"left by a writer killed mid-rename")

    resumed = cache(cache_args(llama_dir, corpus_jsonl, directory))
    total = len(read_manifest(reference).shards)
    assert resumed.shards_written == total - 1  # shard 0 kept; shard 1 corrupt, 2 crashed, rest never started
    assert shard_hashes(directory) == shard_hashes(reference)
    assert not [p.name for p in directory.glob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def test_slurm_array_parts_and_finalize(tmp_path, reference, llama_dir, corpus_jsonl, capsys):
    directory = tmp_path / "cache"
    args = cache_args(llama_dir, corpus_jsonl, directory)
    first = cache(args, num_tasks=3, task_index=0)
    assert not (directory / "manifest.json").exists() and first.shards_written > 0
    with pytest.raises(FileNotFoundError, match="shards are missing"):
        cache(args, finalize_only=True)
    cache(args, num_tasks=3, task_index=2)
    cache(args, num_tasks=3, task_index=1)  # the last part writes the manifest
    assert shard_hashes(directory) == shard_hashes(reference)
    assert cli.main(["cache", "--finalize", *args]) == 0  # complete already: a hit


def test_torchrun_two_processes_match_one(tmp_path, llama_dir, corpus_jsonl):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = cache_args(llama_dir, corpus_jsonl, tmp_path / "one")
    subprocess.run([sys.executable, "-m", "pipeline.cli", "cache", *args], check=True, env=env, capture_output=True)
    two = tmp_path / "two"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "pipeline.cli", "cache", *cache_args(llama_dir, corpus_jsonl, two)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "part 1/2" in run.stderr and "part 0/2" in run.stderr
    assert run.stderr.count("] tokenizing ") == 1  # one rank built the token store; the other memory-mapped it
    assert shard_hashes(two) == shard_hashes(tmp_path / "one")


def test_inspect_and_verify(reference, tmp_path, capsys):
    assert cli.main(["inspect", "--json", str(reference)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tokens"] == read_manifest(reference).tokens
    assert 0 < summary["mean_top1_prob"] < 1 and 0 < summary["mean_tail_mass"] < 1
    assert summary["bytes_per_token"] > 0
    assert cli.main(["verify", str(reference)]) == 0

    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(reference), str(broken)], check=True)
    (broken / "train-00000.arrow").write_bytes(b"x")
    (broken / "eval-00000.arrow").unlink()
    capsys.readouterr()
    assert cli.main(["verify", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "train-00000.arrow" in err
    assert "missing" in err and "eval-00000.arrow" in err


def test_eval_path_is_cached_as_eval_split(tmp_path, llama_dir, corpus_jsonl):
    eval_file = tmp_path / "held.txt"
    eval_file.write_text("In the beginning was the Word.\nAnd the Word was with God.\n")
    args = cache_args(llama_dir, corpus_jsonl, tmp_path / "c", **{"data.holdout_fraction": 0.0,
                                                                "data.eval_path": eval_file})
    manifest = read_manifest(cache(args).directory)
    evals = manifest.shards_for("eval")
    assert len(evals) == 1 and evals[0].sequences == 1
    shard = read_all(manifest.location)[evals[0].path]
    real = int(shard["loss_mask"].sum()) + 1  # rows whose next token is real, plus the final EOS
    assert 0 < real < shard["loss_mask"].size and shard["loss_mask"][0, : real - 1].all()
    assert np.all(shard["input_ids"][0, real:] == manifest.tokenizer["pad_token_id"])
    assert shard["input_ids"][0, real - 1] == manifest.tokenizer["eos_token_id"]
