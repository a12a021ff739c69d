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

from storage.errors import CacheNotFoundError, ChecksumError, RemoteStorageError, first_line
from storage.io.atomic import atomic_write
from storage.io.hashing import listing, tree_sha256

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
    except FileNotFoundError as exc:
        if "bucket" in str(exc).lower():  # S3's NoSuchBucket; a missing key's message is only the key
            raise CacheNotFoundError(f"{url}: its bucket does not exist; create it or correct the URL") from None
        raise CacheNotFoundError(f"{url} does not exist (while trying to {what})") from None
    except Exception as exc:  # OSError and botocore's own errors (a refused connection is not an OSError)
        if not (isinstance(exc, OSError) or type(exc).__module__.startswith(("botocore", "aiobotocore"))):
            raise
        first = first_line(exc)
        raise RemoteStorageError(f"{url}: could not {what} ({first})") from exc


def _is_s3(fs) -> bool:
    return fs.protocol[0] in ("s3", "s3a")


def _make_parent(fs, path: str) -> None:
    """File systems with folders (``file://``, ...) need the parent before a write; on S3 a prefix needs nothing
    (and s3fs's ``makedirs`` would create a missing bucket instead of reporting it)."""
    if not _is_s3(fs):
        fs.makedirs(fs._parent(path), exist_ok=True)


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
        _make_parent(fs, path)
        expected = _s3_upload(fs, path, local, size) if _is_s3(fs) else fs.put_file(str(local), path)
        if fs.info(path)["size"] != size:
            raise ChecksumError(f"{url} holds {fs.info(path)['size']} bytes after uploading {size}; rerun to retry")
        reported = _reported_sha256(fs, path) if expected else None
        if reported is not None and reported.split("-")[0] == expected:
            return
        if tree_sha256(path, fs) != tree_sha256(local):
            raise ChecksumError(f"{url} does not read back as the file uploaded from {local}; rerun to retry")


def _reported_sha256(fs, path: str) -> str | None:
    bucket, key = _bucket_key(path)
    return fs.call_s3("head_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED").get("ChecksumSHA256")


def create_exclusive(url: str, data: bytes) -> bool:
    """Write ``data`` to ``url`` only if nothing is there (``If-None-Match: *`` on S3); False when something is."""
    fs, path = open_fs(url)
    with naming(url, "create"):
        _make_parent(fs, path)
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
    return True


def read_bytes(url: str) -> bytes:
    fs, path = open_fs(url)
    with naming(url, "read"):
        return fs.cat_file(path)


def exists(url: str) -> bool:
    fs, path = open_fs(url)
    with naming(url, "look up"):
        return fs.exists(path)


def child_names(url: str) -> list[str]:
    """Names of the objects and folders directly under ``url``; none when nothing is there."""
    fs, path = open_fs(url)
    with naming(url, "list"):
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if p.rstrip("/") != path)
        except FileNotFoundError:
            return []


def remove(url: str) -> None:
    """Delete the object or the folder of objects at ``url``, if any."""
    fs, path = open_fs(url)
    with naming(url, "delete"):
        if fs.exists(path):
            fs.rm(path, recursive=True)


def measure(url: str) -> tuple[int, str] | None:
    """``(bytes, sha256)`` of a remote shard (a file, or a folder, hashed as ``storage.io.hashing`` hashes one), or
    None when it is missing. A single-part S3 object's sha256 comes from the store; anything else is read once."""
    fs, path = open_fs(url)
    with naming(url, "check"):
        if not fs.exists(path):
            return None
        files = listing(path, fs)
        size = sum(s for _, s in files)
        reported = _reported_sha256(fs, path) if files == [("", size)] and _is_s3(fs) else None
        if reported and "-" not in reported:
            return size, base64.b64decode(reported).hex()
        return size, tree_sha256(path, fs)


def upload_tree(local: Path, url: str, last: tuple[str, ...] = ()) -> None:
    """Upload a file, or every file of a folder (the names in ``last`` after all others), each verified."""
    if local.is_file():
        upload_file(local, url)
        return
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: (p.name in last, p.as_posix()))
    for file in files:
        upload_file(file, f"{url}/{file.relative_to(local).as_posix()}")


def _get(fs, path: str, dest: Path) -> None:
    """Download a file or a folder of files to ``dest`` (which does not exist yet)."""
    files = listing(path, fs)
    if files and files[0][0] == "":
        fs.get_file(path, str(dest))
        return
    for name, _ in files:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f"{path}/{name}", str(dest / name))


def download(url: str, dest: Path) -> Path:
    """Download a file or a folder to ``dest`` atomically (readers never see part of it)."""
    fs, path = open_fs(url)
    with naming(url, "download"), atomic_write(dest) as tmp:
        _get(fs, path, tmp)
    return dest


def download_verified(url: str, dest: Path, sha256: str) -> Path:
    """Download a shard (a file or a folder) to ``dest`` atomically, refusing bytes whose sha256 is not ``sha256``."""
    fs, path = open_fs(url)
    with naming(url, "download"), atomic_write(dest) as tmp:
        _get(fs, path, tmp)
        if tree_sha256(tmp) != sha256:
            raise ChecksumError(f"{url} does not match its sha256 in the manifest; the remote copy is damaged: "
                                "rebuild the cache")
    return dest
