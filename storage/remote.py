"""Object storage: the one module that talks to a store behind a URL (``s3://``, ``gs://``, ``file://``, any fsspec
protocol that is installed).

A remote object has no rename, so writes go straight to their final key: a PUT, or a completed multipart
upload, appears whole or not at all. Every upload is verified (its size, and its sha256 where the store returns
one, else by reading it back), and every download is hashed before it is moved into place. Credentials come
only from each backend's standard environment and files (``AWS_*``, ``AWS_ENDPOINT_URL``, profiles); nothing
here takes or stores them.
"""
from __future__ import annotations

import base64
import hashlib
import os
import re
from contextlib import contextmanager
from pathlib import Path

from storage.atomic import atomic_write
from storage.errors import CacheNotFoundError, ChecksumError, RemoteStorageError
from storage.manifest import file_sha256

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
PART_BYTES = 64 << 20
"""Uploads above this size go as a multipart upload of parts of this size."""


def is_url(path) -> bool:
    return isinstance(path, str) and bool(URL.match(path))


def open_fs(url: str):
    """``(filesystem, path)`` for ``url``. Listings are not cached, so a resume sees what other processes wrote;
    botocore's standard retry mode backs off on throttling and connection errors (``AWS_MAX_ATTEMPTS`` and
    ``AWS_RETRY_MODE`` still decide when set)."""
    import fsspec

    options = {"use_listings_cache": False}
    if url.startswith(("s3://", "s3a://")) and not {"AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"} & os.environ.keys():
        options["config_kwargs"] = {"retries": {"max_attempts": 5, "mode": "standard"}}
    return fsspec.core.url_to_fs(url, **options)


@contextmanager
def naming(url: str, what: str):
    """Turn a store's error into one that names ``url``: its messages often name only the key, or nothing."""
    try:
        yield
    except (CacheNotFoundError, ChecksumError, FileExistsError):
        raise
    except FileNotFoundError:
        raise CacheNotFoundError(f"{url} does not exist (while trying to {what})") from None
    except Exception as exc:  # OSError and botocore's own errors (a refused connection is not an OSError)
        if not (isinstance(exc, OSError) or type(exc).__module__.startswith(("botocore", "aiobotocore"))):
            raise
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise RemoteStorageError(f"{url}: could not {what} ({first})") from exc


def _bucket_key(path: str) -> tuple[str, str]:
    bucket, _, key = path.partition("/")
    return bucket, key


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _s3_upload(fs, path: str, local: Path, size: int) -> str | None:
    """Upload to S3 with SHA256 checksums (per part for a multipart upload); return the checksum S3 should
    report: the object's, or the composite of the parts' digests."""
    bucket, key = _bucket_key(path)
    if size <= PART_BYTES:
        body = local.read_bytes()
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, ChecksumAlgorithm="SHA256")
        return _b64(hashlib.sha256(body).digest())
    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key, ChecksumAlgorithm="SHA256")
    parts, digests = [], []
    try:
        with open(local, "rb") as handle:
            while block := handle.read(PART_BYTES):
                number = len(parts) + 1
                done = fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                                  PartNumber=number, Body=block, ChecksumAlgorithm="SHA256")
                parts.append({"PartNumber": number, "ETag": done["ETag"], "ChecksumSHA256": done["ChecksumSHA256"]})
                digests.append(hashlib.sha256(block).digest())
        fs.call_s3("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                   MultipartUpload={"Parts": parts})
    except BaseException:
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload["UploadId"])
        raise
    return _b64(hashlib.sha256(b"".join(digests)).digest())


def upload_file(local: Path, url: str) -> None:
    """Upload one file to ``url`` and verify it: its size, then the sha256 S3 reports, or, on a store that
    reports none, the sha256 of the object read back."""
    fs, path = open_fs(url)
    size = local.stat().st_size
    with naming(url, "upload"):
        expected = _s3_upload(fs, path, local, size) if fs.protocol[0] in ("s3", "s3a") else fs.put_file(str(local), path)
        if fs.info(path)["size"] != size:
            raise ChecksumError(f"{url} holds {fs.info(path)['size']} bytes after uploading {size}; rerun to retry")
        reported = _reported_sha256(fs, path) if expected else None
        if reported is not None and reported.split("-")[0] == expected:
            return
        if hashlib.sha256(fs.cat_file(path)).hexdigest() != file_sha256(local):
            raise ChecksumError(f"{url} does not read back as the file uploaded from {local}; rerun to retry")


def _reported_sha256(fs, path: str) -> str | None:
    bucket, key = _bucket_key(path)
    return fs.call_s3("head_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED").get("ChecksumSHA256")


def create_exclusive(url: str, data: bytes) -> bool:
    """Write ``data`` to ``url`` only if nothing is there (``If-None-Match: *`` on S3); False when something is."""
    fs, path = open_fs(url)
    with naming(url, "create"):
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
    return True


def read_bytes(url: str) -> bytes:
    fs, path = open_fs(url)
    with naming(url, "read"):
        return fs.cat_file(path)


def download_verified(url: str, dest: Path, sha256: str) -> Path:
    """Download ``url`` to ``dest`` atomically, refusing bytes whose sha256 is not ``sha256``."""
    fs, path = open_fs(url)
    with naming(url, "download"), atomic_write(dest) as tmp:
        fs.get_file(path, str(tmp))
        if file_sha256(tmp) != sha256:
            raise ChecksumError(f"{url} does not match its sha256 in the manifest; the remote copy is damaged: "
                                "rebuild the cache")
    return dest
