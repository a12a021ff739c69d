"""Two jobs at once on one output: the same cache part twice, two parts finishing together, two trainings."""
from __future__ import annotations

import os
import subprocess
import time

from jobs import cache_overrides, check_cache, check_training, distillery, shard_hashes, train_overrides

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, err = process.communicate(timeout=600)
    return process.returncode, err


def test_same_part_twice(tmp_path, reference_cache, chaos_teacher, chaos_corpus, chaos_results):
    command = distillery("cache", *cache_overrides(chaos_teacher, chaos_corpus, tmp_path / "cache", "arrow"))
    first, second = start(command), start(command)
    outcomes = [finish(first), finish(second)]
    assert [code for code, _ in outcomes] == [0, 0], outcomes
    waited = sum("waiting for it" in err for _, err in outcomes)
    assert waited == 1, [err[-2000:] for _, err in outcomes]
    assert sum("wrote manifest" in err for _, err in outcomes) == 1
    check_cache(tmp_path / "cache", shard_hashes(reference_cache[0]))
    chaos_results.add_case("concurrency", "two `distillery cache` on the same cache and part",
                           "the second waits for the first's lock, then finds every shard done; one manifest, "
                           "bitwise, verified")


def test_two_parts_finish_together(tmp_path, reference_cache, chaos_teacher, chaos_corpus, chaos_results):
    overrides = cache_overrides(chaos_teacher, chaos_corpus, tmp_path / "cache", "arrow")
    parts = [start(distillery("cache", "--num-tasks", "2", "--task-index", str(i), *overrides)) for i in (0, 1)]
    outcomes = [finish(part) for part in parts]
    assert [code for code, _ in outcomes] == [0, 0], outcomes
    assert sum("wrote manifest" in err for _, err in outcomes) == 1, [err[-2000:] for _, err in outcomes]
    check_cache(tmp_path / "cache", shard_hashes(reference_cache[0]))
    chaos_results.add_case("concurrency", "two parts of a 2-task array started together",
                           "exactly one writes manifest.json; bitwise, verified")


def test_two_trainings_on_one_out_dir(tmp_path, reference_cache, reference_training, chaos_results):
    out = tmp_path / "train"
    command = distillery("train", *train_overrides(reference_cache[0], out))
    first = start(command)
    deadline = time.monotonic() + 120
    while not ((out / ".lock").is_file() and (out / ".lock").read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    code, err = finish(start(command))
    assert code == 2 and "is in use by pid" in err and str(out) in err, err[-2000:]
    assert finish(first)[0] == 0
    check_training(out, reference_training[0])
    chaos_results.add_case("concurrency", "a second `distillery train` on a running job's out_dir",
                           "refused with exit 2, naming the holder's pid; the first finishes bitwise")
