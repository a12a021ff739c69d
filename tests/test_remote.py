"""Object storage primitives against a real S3 API (moto's server on loopback): verified uploads, exclusive
creates, verified downloads, and errors that name the URL."""
from __future__ import annotations

import hashlib
import os

import fsspec
import pytest

from storage.errors import CacheNotFoundError, ChecksumError, RemoteStorageError
from storage.remote import fs as remote


def test_urls_and_local_paths_are_told_apart():
    assert remote.is_url("s3://b/k") and remote.is_url("file:///tmp/x") and remote.is_url("gs://b")
    assert not remote.is_url("/tmp/x") and not remote.is_url("runs/cache") and not remote.is_url(None)


@pytest.mark.parametrize("size", [1000, 3 * 4096 + 17])  # one PUT; a multipart upload of 4 parts
def test_upload_is_verified_and_reads_back(bucket, tmp_path, monkeypatch, size):
    monkeypatch.setattr(remote, "PART_BYTES", 4096)
    local = tmp_path / "shard.arrow"
    local.write_bytes(os.urandom(size))
    remote.upload_file(local, f"{bucket}/c/shard.arrow")
    assert remote.read_bytes(f"{bucket}/c/shard.arrow") == local.read_bytes()
    fs, path = remote.open_fs(f"{bucket}/c/shard.arrow")
    bucket_name, key = path.split("/", 1)
    head = fs.call_s3("head_object", Bucket=bucket_name, Key=key, ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"]  # S3 holds a sha256 the upload was checked against
    assert not fs.call_s3("list_multipart_uploads", Bucket=bucket_name).get("Uploads")


def test_exclusive_create_lets_one_writer_win(bucket):
    url = f"{bucket}/c/fingerprint.json"
    assert remote.create_exclusive(url, b'{"fingerprint": "a"}')
    assert not remote.create_exclusive(url, b'{"fingerprint": "b"}')
    assert remote.read_bytes(url) == b'{"fingerprint": "a"}'


def test_download_is_hashed_before_it_lands(bucket, tmp_path):
    data = os.urandom(5000)
    fsspec.filesystem("s3").pipe_file(f"{bucket[5:]}/c/s.arrow", data)
    good = remote.download_verified(f"{bucket}/c/s.arrow", tmp_path / "s.arrow", hashlib.sha256(data).hexdigest())
    assert good.read_bytes() == data
    with pytest.raises(ChecksumError, match=f"{bucket}/c/s.arrow does not match its sha256"):
        remote.download_verified(f"{bucket}/c/s.arrow", tmp_path / "t.arrow", "0" * 64)
    assert not (tmp_path / "t.arrow").exists() and list(tmp_path.iterdir()) == [good]


def test_errors_name_the_url(bucket, tmp_path, monkeypatch):
    with pytest.raises(CacheNotFoundError, match=f"{bucket}/nothing-here does not exist"):
        remote.read_bytes(f"{bucket}/nothing-here")
    with pytest.raises(CacheNotFoundError, match="s3://no-such-bucket-x1/k: its bucket does not exist"):
        remote.read_bytes("s3://no-such-bucket-x1/k")
    from s3fs import S3FileSystem

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    S3FileSystem.clear_instance_cache()  # fsspec reuses a filesystem made for the same options
    try:
        with pytest.raises(RemoteStorageError, match=f"{bucket}/k: could not read .*Could not connect"):
            remote.read_bytes(f"{bucket}/k")
    finally:
        S3FileSystem.clear_instance_cache()
