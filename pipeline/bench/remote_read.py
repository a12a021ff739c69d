"""Reading a cache from object storage: is the reader still at least 10x faster than the student consumes?

Issue 12's acceptance. One cache is read three ways, interleaved in one process so that machine noise hits
them alike: from local disk, from S3 with a cold local shard cache (the first use on a node, downloads
included), and from S3 again once every shard has a local copy. Each is set against the tokens per second of
the student's training step on that cache. The S3 store is moto's server on loopback: it has no network
latency or bandwidth limit, but serves from this process's cores, so the first-use figure is the cost of the
client path (requests, sha256 checks, atomic moves, prefetch) plus the server's own work, not a real link's;
the download figures are reported on their own, so that a real link's bandwidth can be set against the bytes
per token. moto is a dev dependency: without it
the section is a single record saying so.
"""
from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import platform
import shutil
import statistics
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pipeline.bench.stage2 import CPU, rewritten_cache, train_step_setting
from pipeline.cache.config import CacheConfig
from pipeline.train.config import LossConfig
from storage import (
    MANIFEST_NAME,
    ShardPlan,
    SoftTargetStream,
    StreamOrder,
    open_cache,
    open_fs,
    read_manifest,
    upload_file,
)

DEFAULT_SHARD_SEQUENCES = CacheConfig.shard_size
"""Sequences per shard of a cache built with the defaults: the shard size whose downloads a real run pays."""
MIN_OVER_STUDENT = 10.0
"""The issue's acceptance: reader tok/s at least this many times the student's."""
_CLEARED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3")


def cpu_model() -> str:
    """The CPU's model name (as the chaos results name it), so figures from different machines are not mixed."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or platform.machine())


@contextmanager
def s3_server(key_id: str = "bench-key-id", secret: str = "bench-secret"):
    """moto's S3 on a free loopback port, reached through the standard AWS environment only while in use, with
    the dummy credentials ``key_id`` and ``secret`` (the tests look for theirs in everything written).

    The environment is restored afterwards, and s3fs's cached filesystems are dropped on the way in and out:
    they keep the endpoint they were made with, so one made for another server would talk to that one.
    """
    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": key_id,
           "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    saved = {key: os.environ.get(key) for key in (*env, *_CLEARED)}
    try:
        for key in _CLEARED:
            os.environ.pop(key, None)
        os.environ.update(env)
        S3FileSystem.clear_instance_cache()
        yield env["AWS_ENDPOINT_URL"]
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        S3FileSystem.clear_instance_cache()
        server.stop()


@contextmanager
def scratch_bucket():
    """A new bucket (its ``s3://`` URL), deleted with its objects afterwards: moto keeps its buckets in the
    memory of the process, for every server it starts, so a fixed name would clash with the next run's and the
    cache would stay in memory."""
    bucket = f"distillery-bench-{uuid.uuid4().hex[:12]}"
    fs, _ = open_fs(f"s3://{bucket}")
    fs.mkdir(bucket)
    try:
        yield f"s3://{bucket}"
    finally:
        if fs.exists(f"{bucket}/cache"):
            fs.rm(f"{bucket}/cache", recursive=True)
        fs.rmdir(bucket)


def resharded_cache(source: Path, target: Path, sequences: int) -> Path:
    """A copy of ``source`` cut into shards of ``sequences`` sequences.

    The bench caches use small shards, to be quick to build; a download costs per request as well as per byte,
    so the S3 figures are taken on shards of the size a default cache has."""

    def shards(opened, backend):
        for split in opened.manifest.splits:
            parts = [backend.read(opened.store.path(record)) for record in opened.manifest.shards_for(split)]
            if not parts:
                continue
            joined = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
            total = len(joined["input_ids"])
            for index, start in enumerate(range(0, total, sequences)):
                yield ShardPlan(split, index, start, min(sequences, total - start), backend.suffix), \
                    {name: array[start : start + sequences] for name, array in joined.items()}

    identity = {"resharded": read_manifest(source).fingerprint, "sequences": sequences}
    return rewritten_cache(source, target, identity, f"the shards of {source} cut into shards of {sequences} "
                           "sequences", shards)


def upload_cache(directory: Path, url: str) -> tuple[float, int]:
    """Copy a finished local cache to ``url`` file by file, the manifest last as a writer would (it marks the
    cache complete), dot-files (locks, claims) left out; return (seconds, bytes)."""
    files = [p for p in directory.rglob("*")
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)]
    files.sort(key=lambda p: (p.name == MANIFEST_NAME, p.as_posix()))
    start = time.perf_counter()
    for file in files:
        upload_file(file, f"{url}/{file.relative_to(directory).as_posix()}")
    return time.perf_counter() - start, sum(p.stat().st_size for p in files)


def _pass(location, batch_size: int, local_dir: Path | None = None) -> tuple[float, int]:
    """(seconds, tokens) of one epoch of the training stream, opening the cache included (for a URL that is the
    manifest's download); the stream verifies each shard as training does."""
    start = time.perf_counter()
    cache = open_cache(location, local_dir)
    stream = SoftTargetStream(cache, StreamOrder(batch_size))
    batches = iter(stream)
    tokens = sum(batch["input_ids"].numel() for batch in itertools.islice(batches, stream.steps_per_epoch))
    seconds = time.perf_counter() - start
    batches.close()  # stops the stream's read-ahead thread
    cache.store.close()  # and the shard prefetch thread
    return seconds, tokens


def _download(url: str, local_dir: Path) -> tuple[float, int]:
    """(seconds, bytes) to fetch every train shard into an empty local shard cache, one after the other and
    without a reader: the download cost the first pass hides behind, or waits on."""
    cache = open_cache(url, local_dir)
    records = cache.manifest.shards_for("train")
    start = time.perf_counter()
    for record in records:
        cache.store.path(record)
    seconds = time.perf_counter() - start
    cache.store.close()
    return seconds, sum(r.bytes for r in records)


def student_step_seconds(cache_dir: Path, student: dict, batch_size: int, rounds: int = 5) -> float:
    """Median seconds of one cached-KD optimizer step of ``student``, timed as the stage-2 section times it;
    for when that section's figure is not at hand."""
    step = train_step_setting(cache_dir, student, batch_size, LossConfig(), CPU, 1024)
    times = [step() for _ in range(rounds + 2)][2:]  # the first steps warm up allocators and caches
    return statistics.median(times)


def _spread(tokens: int, seconds: list[float]) -> list[float]:
    return [tokens / max(seconds), tokens / min(seconds)]


def _timings(cache_dir: Path, url: str, batch_size: int, scratch: Path, repeats: int) -> tuple[dict, int]:
    """Seconds of every repetition per source, interleaved so machine noise hits them alike, and the tokens of a
    pass. Each repetition's S3 reads start from local copies of their own, deleted afterwards."""
    times: dict[str, list[float]] = {"local": [], "s3_first_use": [], "s3_warm": [], "download": []}
    for rep in range(repeats):
        seconds, tokens = _pass(cache_dir, batch_size)
        times["local"].append(seconds)
        times["s3_first_use"].append(_pass(url, batch_size, scratch / f"s3-{rep}")[0])
        times["s3_warm"].append(_pass(url, batch_size, scratch / f"s3-{rep}")[0])
        times["download"].append(_download(url, scratch / f"download-{rep}")[0])
        shutil.rmtree(scratch, ignore_errors=True)
    return times, tokens


def remote_read_records(cache_dir: Path, batch_size: int, scratch: Path, student_step_s: float | None = None,
                        student: dict | None = None, repeats: int = 3,
                        shard_sequences: int | None = DEFAULT_SHARD_SEQUENCES) -> list[dict]:
    """One record per source (local disk, S3 first use, S3 warm): read tok/s (median, spread) and its ratio to
    the student's tok/s, a ``student_step_s`` step (the stage-2 section's figure; measured for ``student`` when
    not given) on ``batch_size`` sequences of the cache; first use also has the download's seconds and MB/s.
    The cache is read as a copy cut into shards of ``shard_sequences`` (None: as it is). A single record with a
    ``note`` when moto is not installed."""
    cache_dir = Path(cache_dir)
    if shard_sequences is not None:
        cache_dir = resharded_cache(cache_dir, scratch / "cache", shard_sequences)
    manifest = read_manifest(cache_dir)
    train = manifest.shards_for("train")
    train_bytes = sum(r.bytes for r in train)
    common = {"cpu": cpu_model(), "threads": os.cpu_count(), "repeats": repeats, "batch_size": batch_size,
              "shards": len(train), "shard_mb": train_bytes / len(train) / 1e6}
    try:
        if importlib.util.find_spec("moto") is None:
            return [{"source": "s3", "note": "skipped: moto is not installed (a dev dependency: "
                                             "pip install -e '.[dev]')", **common}]
        with s3_server(), scratch_bucket() as bucket:
            url = f"{bucket}/cache"
            upload_s, upload_bytes = upload_cache(cache_dir, url)
            times, tokens = _timings(cache_dir, url, batch_size, scratch / "reads", repeats)
        if student_step_s is None:
            student_step_s = student_step_seconds(cache_dir, student, batch_size)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    student_rate = batch_size * manifest.seq_len / student_step_s
    common.update(tokens=tokens, student_step_s=student_step_s, student_tok_per_s=student_rate)
    median = {source: statistics.median(t) for source, t in times.items()}
    rate = {source: tokens / median[source] for source in ("local", "s3_first_use", "s3_warm")}
    records = [{"source": source, "read_tok_per_s": rate[source], "read_spread": _spread(tokens, times[source]),
                "over_student": rate[source] / student_rate,
                "at_least_10x": "yes" if rate[source] >= MIN_OVER_STUDENT * student_rate else "no", **common}
               for source in rate]
    records[1].update(download_s=median["download"], download_mb_per_s=train_bytes / median["download"] / 1e6,
                      first_use_extra_s=median["s3_first_use"] - median["s3_warm"],
                      bytes_per_token=train_bytes / sum(r.tokens for r in train), upload_s=upload_s,
                      upload_mb_per_s=upload_bytes / upload_s / 1e6)
    return records
