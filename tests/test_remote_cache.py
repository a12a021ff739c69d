"""Caches on object storage, against a real S3 API (moto's server on loopback): stage 1 writes and resumes on
``s3://``, ``inspect`` / ``verify`` read URLs, training streams remote shards through a bounded local cache."""
from __future__ import annotations

import json
import os
import shutil
import threading
import uuid

import fsspec
import pytest
import torch
from helpers import cache, cache_args, train, train_args
from safetensors.torch import load_file

from pipeline import cli
from storage.errors import ChecksumError
from storage.manifest import read_manifest
from storage.remote import fs as remote
from storage.remote.copies import LocalCopies
from storage.remote.store import open_cache

SMALL = {"cache.shard_size": 32}  # 10 shards, so that a resume has something left to do


def _hashes(manifest) -> dict[str, str]:
    return {s.path: s.sha256 for s in manifest.shards}


@pytest.fixture(scope="module")
def module_bucket(s3_endpoint) -> str:
    name = f"remote-cache-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("s3", use_listings_cache=False).mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, llama_dir, corpus_jsonl):
    """The same cache, written to local disk."""
    directory = tmp_path_factory.mktemp("local") / "cache"
    cache(cache_args(llama_dir, corpus_jsonl, directory, **SMALL))
    return directory


@pytest.fixture(scope="module")
def remote_cache(module_bucket, tmp_path_factory, llama_dir, corpus_jsonl) -> str:
    """``distillery cache cache.root=s3://.../caches``: the URL it printed."""
    work = tmp_path_factory.mktemp("work")
    args = cache_args(llama_dir, corpus_jsonl, "", **SMALL, **{"cache.root": f"{module_bucket}/caches",
                                                               "cache.local_dir": work})
    result = cache([a for a in args if not a.startswith("cache.dir=")])
    assert not result.hit and result.complete
    return str(result.directory)


def test_stage_one_writes_the_cache_to_s3_and_the_shards_equal_a_local_run(remote_cache, module_bucket,
                                                                           local_reference, tmp_path):
    assert remote_cache.startswith(f"{module_bucket}/caches/")
    names = set(remote.child_names(remote_cache))
    shards = [s.path for s in read_manifest(local_reference).shards]
    assert names == {"manifest.json", "fingerprint.json", "config.yaml", "tokenizer",
                     *shards, *(s + ".done.json" for s in shards)}  # no lock files or temporaries travel
    manifest = open_cache(remote_cache, tmp_path).manifest
    assert _hashes(manifest) == _hashes(read_manifest(local_reference))
    assert manifest.location == remote_cache


def test_inspect_verify_and_a_second_run_is_a_hit(remote_cache, module_bucket, llama_dir, corpus_jsonl,
                                                  local_reference, tmp_path, monkeypatch, capsys):
    assert cli.main(["inspect", "--json", remote_cache]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["directory"] == remote_cache and summary["tokens"] == read_manifest(local_reference).tokens
    assert cli.main(["verify", remote_cache]) == 0
    assert f"shards verified in {remote_cache}" in capsys.readouterr().out

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded on a cache hit")

    monkeypatch.setattr("pipeline.cache.teacher_pass.load_model", no_teacher)
    args = cache_args(llama_dir, corpus_jsonl, "", **SMALL, **{"cache.root": f"{module_bucket}/caches",
                                                               "cache.local_dir": tmp_path / "elsewhere"})
    assert cli.main(["cache", *[a for a in args if not a.startswith("cache.dir=")]]) == 0
    assert "cache hit" in capsys.readouterr().err


def test_a_killed_upload_resumes_with_only_the_missing_shards(bucket, llama_dir, corpus_jsonl, local_reference,
                                                              tmp_path, monkeypatch):
    url, uploads = f"{bucket}/cache", []
    upload, create = remote.upload_file, remote.create_exclusive

    def counting(local, destination):
        uploads.append(destination.rsplit("/", 1)[1])
        upload(local, destination)
        if sum(name.endswith(".done.json") for name in uploads) == 2 and not resumed:
            raise KeyboardInterrupt("killed after the second shard's upload")

    def counting_create(destination, data):
        uploads.append(destination.rsplit("/", 1)[1])
        return create(destination, data)

    resumed = False
    monkeypatch.setattr(remote, "upload_file", counting)
    monkeypatch.setattr(remote, "create_exclusive", counting_create)
    args = cache_args(llama_dir, corpus_jsonl, url, **SMALL, **{"cache.local_dir": tmp_path})
    with pytest.raises(BaseException, match="second shard"):
        cache(args)
    assert not remote.exists(f"{url}/manifest.json")
    before = [n for n in uploads if n.endswith(".arrow")]
    assert len(before) == 2
    shutil.rmtree(tmp_path)  # requeued on another node: the local working copy is gone
    resumed, uploads[:] = True, []
    assert cache(args).shards_written == len(read_manifest(local_reference).shards) - 2
    again = [n for n in uploads if n.endswith(".arrow")]
    assert set(again).isdisjoint(before) and len(again) + 2 == len(read_manifest(local_reference).shards)
    assert uploads[-1] == "manifest.json"
    assert _hashes(open_cache(url, tmp_path / "read").manifest) == _hashes(read_manifest(local_reference))


def test_a_damaged_remote_shard_is_caught_on_first_read_with_its_url(bucket, local_reference, tmp_path, capsys):
    fs = fsspec.filesystem("file")
    url = f"{bucket}/copy"
    for path in sorted(local_reference.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            remote.upload_file(path, f"{url}/{path.relative_to(local_reference).as_posix()}")
    first = read_manifest(local_reference).shards[0].path
    s3, key = remote.open_fs(f"{url}/{first}")
    bucket_name, key = key.split("/", 1)
    s3.call_s3("put_object", Bucket=bucket_name, Key=key, Body=fs.cat_file(str(local_reference / first))[::-1])
    opened = open_cache(url, tmp_path)
    with pytest.raises(ChecksumError, match=f"{url}/{first}"):
        opened.store.checked_path(opened.manifest.shards[0])
    assert LocalCopies(tmp_path / "shards").bytes_on_disk() == 0  # the damaged bytes never became a local copy
    assert cli.main(["verify", url]) == 1
    assert f"checksum mismatch: {url}/{first}" in capsys.readouterr().err


def _final_weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def test_training_from_s3_equals_training_from_the_local_copy(remote_cache, local_reference, tmp_path):
    local = train(train_args(local_reference, tmp_path / "local"))
    streamed = train(train_args(remote_cache, tmp_path / "remote", **{"cache.local_dir": tmp_path / "copies",
                                                                        "train.num_workers": 1}))  # a forked reader
    a, b = _final_weights(local.parent), _final_weights(streamed.parent)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_local_copies_stay_within_local_bytes_over_epochs(remote_cache, local_reference, tmp_path):
    shards = read_manifest(local_reference).shards_for("train")
    budget = int(2.5 * max(s.bytes for s in shards))
    copies = LocalCopies(tmp_path / "copies" / "shards", budget)
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], copies.bytes_on_disk())
            done.wait(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    steps = 3 * sum(s.sequences for s in shards) // 16  # three epochs at batch size 16
    try:
        final = train(train_args(remote_cache, tmp_path / "out", **{
            "cache.local_dir": tmp_path / "copies", "cache.local_bytes": budget, "train.steps": steps,
            "cache.shuffle_buffer": 32,  # a shard at a time, as a real cache's default of 1024 sequences is
            "train.checkpoint_every": steps, "train.eval_every": steps, "train.batch_size": 16}))
    finally:
        done.set()
        watcher.join()
    assert (final / "model.safetensors").is_file()
    assert 0 < peak[0] <= budget


def test_no_credential_is_written_or_printed(remote_cache, module_bucket, tmp_path_factory, s3_endpoint, capfd):
    """Credentials come from the environment only: none is in any file written here (the local working copies,
    shard copies, outputs), in any object of the bucket, or in what the commands print."""
    secrets = [os.environ["AWS_ACCESS_KEY_ID"].encode(), os.environ["AWS_SECRET_ACCESS_KEY"].encode()]
    assert cli.main(["inspect", remote_cache]) == 0 and cli.main(["verify", remote_cache]) == 0
    printed = capfd.readouterr()
    assert not [s for s in secrets if s in (printed.out + printed.err).encode()]
    written = [p for p in tmp_path_factory.getbasetemp().rglob("*") if p.is_file()]
    assert len(written) > 10
    assert not [p for p in written if any(s in p.read_bytes() for s in secrets)]
    fs = fsspec.filesystem("s3", use_listings_cache=False)
    objects = fs.find(module_bucket)
    assert len(objects) > 10 and not [o for o in objects if any(s in fs.cat_file(o) for s in secrets)]


def test_any_fsspec_url_works_file_urls_included(llama_dir, corpus_jsonl, local_reference, tmp_path):
    url = f"file://{tmp_path}/dest/cache"
    result = cache(cache_args(llama_dir, corpus_jsonl, url, **SMALL, **{"cache.local_dir": tmp_path / "work"}))
    assert result.complete and result.directory == url
    assert (tmp_path / "dest" / "cache" / "manifest.json").is_file()
    opened = open_cache(url, tmp_path / "read")
    assert _hashes(opened.manifest) == _hashes(read_manifest(local_reference)) and not opened.verify()
    assert opened.store.checked_path(opened.manifest.shards[0]).parent == tmp_path / "read" / "shards"
