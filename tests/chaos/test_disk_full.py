"""Disk full: each stage writes to a small tmpfs, fails with one clear line, marks nothing complete, keeps what
was complete, and resumes to the uninterrupted result once space is freed.
``make test`` runs stage 1's; stages 2 and 3 run in ``make chaos`` (``CHAOS_SCALE=full``). They need root
for the tmpfs."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from jobs import (
    cache_overrides,
    check_cache,
    check_run,
    check_training,
    distillery,
    run_command,
    sha256,
    shard_hashes,
    train_overrides,
)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mount; ``resize(bytes)`` changes its size, as freeing space on a full disk does."""
    mount = tmp_path / "disk"
    mount.mkdir()

    def resize(size: int, first: bool = False) -> None:
        options = f"size={size}" if first else f"remount,size={size}"
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], check=True,
                       capture_output=True)

    try:
        resize(1 << 20, first=True)
    except (subprocess.CalledProcessError, FileNotFoundError, PermissionError) as exc:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {exc}")
    yield mount, resize
    subprocess.run(["umount", "-l", str(mount)], check=False)


def used_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def fails_for_space(command: list[str], mount: Path) -> str:
    """Run ``command``: it must exit 2 with one line that says the disk is full and names a path on it."""
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    # A progress bar ends in a carriage return, not a newline: the error starts after it.
    errors = [line[line.index("distillery "):] for line in re.split(r"[\r\n]", done.stderr) if "error:" in line]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and len(errors) == 1, done.stderr[-3000:]
    assert "no space left" in errors[0].lower() and str(mount) in errors[0], errors[0]
    return errors[0]


def intact_done_shards(cache: Path) -> int:
    """Every shard a done record vouches for still matches its recorded sha256; return how many there are."""
    records = [json.loads(p.read_text()) for p in cache.glob("*.done.json")]
    for record in records:
        assert sha256(cache / record["path"]) == record["sha256"], record["path"]
    return len(records)


def test_cache_on_a_full_disk(small_disk, reference_cache, chaos_teacher, chaos_corpus, chaos_results):
    mount, resize = small_disk
    reference, _ = reference_cache
    resize(used_bytes(reference) // 2)
    command = distillery("cache", *cache_overrides(chaos_teacher, chaos_corpus, mount / "cache", "arrow"))
    message = fails_for_space(command, mount)
    assert not (mount / "cache" / "manifest.json").exists()
    kept = intact_done_shards(mount / "cache")
    resize(used_bytes(reference) * 3)
    subprocess.run(command, check=True, capture_output=True)
    check_cache(mount / "cache", shard_hashes(reference))
    chaos_results.add_case("disk full", "stage 1 cache.dir on a tmpfs half the cache's size",
                           f"exit 2, '{message.split(str(mount))[0]}...'; {kept} done shards intact; resumed bitwise")


@pytest.mark.full_scale
def test_training_on_a_full_disk(small_disk, reference_cache, reference_training, chaos_results):
    mount, resize = small_disk
    reference, _ = reference_training
    checkpoint = used_bytes(next(reference.glob("checkpoints/step-*")))
    resize(int(checkpoint * 1.5))
    command = distillery("train", *train_overrides(reference_cache[0], mount / "train"))
    message = fails_for_space(command, mount)
    assert not (mount / "train" / "final").exists()
    resize(used_bytes(reference) * 4)
    subprocess.run(command, check=True, capture_output=True)
    check_training(mount / "train", reference)
    chaos_results.add_case("disk full", "stage 2 train.out_dir on a tmpfs of 1.5 checkpoints",
                           f"exit 2, '{message.split(str(mount))[0]}...'; nothing final; resumed bitwise")


@pytest.mark.full_scale
def test_run_on_a_full_disk(small_disk, reference_run, llama_dir, corpus_jsonl, chaos_results):
    mount, resize = small_disk
    reference, _ = reference_run
    resize(used_bytes(reference) // 3)
    command = run_command(llama_dir, corpus_jsonl)(mount / "run", 0)
    message = fails_for_space(command, mount)
    resize(used_bytes(reference) * 3)
    subprocess.run(command, check=True, capture_output=True)
    check_run(mount / "run", reference)
    chaos_results.add_case("disk full", "stage 3 run.dir on a tmpfs a third of the run's size",
                           f"exit 2, '{message.split(str(mount))[0]}...'; resumed bitwise")
