"""The local shard cache against a real S3 API (moto's server on loopback): one verified download per shard, a
byte budget kept by evicting the least recently used entries no one holds, two processes sharing one directory,
prefetching on a background thread, and pickling for DataLoader workers."""
from __future__ import annotations

import fcntl
import hashlib
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from storage.errors import ChecksumError, ManifestError
from storage.remote import fs as remote
from storage.remote.copies import LocalCopies, LocalCopiesFullError

SHARD = 4000
ROOT = Path(__file__).resolve().parents[1]


def put(bucket: str, name: str, data: bytes) -> tuple[str, str, int]:
    """Upload ``data`` as ``name``; the ``(url, sha256, size)`` a manifest would give for it."""
    fsspec.filesystem("s3").pipe_file(f"{bucket[5:]}/c/{name}", data)
    return f"{bucket}/c/{name}", hashlib.sha256(data).hexdigest(), len(data)


def shards(bucket: str, count: int) -> tuple[list[tuple[str, str, int]], dict[str, bytes]]:
    datas = {f"s{i}.arrow": os.urandom(SHARD) for i in range(count)}
    items = [put(bucket, name, data) for name, data in datas.items()]
    return items, {url: data for (url, _, _), data in zip(items, datas.values())}


@pytest.fixture
def downloads(monkeypatch) -> list[str]:
    """The URLs downloaded from now on, in order."""
    seen, real = [], remote.download_verified

    def counting(url, dest, sha256):
        seen.append(url)
        return real(url, dest, sha256)

    monkeypatch.setattr(remote, "download_verified", counting)
    return seen


def files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def test_a_shard_is_downloaded_once_and_touched_on_every_fetch(bucket, tmp_path, downloads):
    (url, sha, size), = shards(bucket, 1)[0]
    cache = LocalCopies(tmp_path / "local")
    path = cache.fetch(url, sha, size)
    assert path == tmp_path / "local" / f"{sha}.arrow" and hashlib.sha256(path.read_bytes()).hexdigest() == sha
    os.utime(path, (1, 1))
    assert cache.fetch(url, sha, size) == path and downloads == [url]
    assert path.stat().st_mtime > 1  # most recently used again
    assert cache.bytes_on_disk() == size
    with pytest.raises(ManifestError, match="is not 64 lowercase hex digits"):
        cache.fetch(url, "../../etc/passwd", size)


def test_damaged_remote_bytes_raise_naming_the_url_and_leave_nothing(bucket, tmp_path):
    url, sha, size = put(bucket, "s.arrow", os.urandom(SHARD))
    put(bucket, "s.arrow", os.urandom(SHARD))  # the object changes after the manifest recorded its sha256
    with pytest.raises(ChecksumError, match=f"{url} does not match its sha256"):
        LocalCopies(tmp_path / "local").fetch(url, sha, size)
    assert files(tmp_path / "local") == [".locks/evict.lock"]


def test_the_budget_holds_after_every_fetch(bucket, tmp_path, downloads):
    items, originals = shards(bucket, 6)
    cache = LocalCopies(tmp_path / "local", budget=int(2.5 * SHARD))
    for url, sha, size in items * 2:
        assert cache.fetch(url, sha, size).read_bytes() == originals[url]
        assert cache.bytes_on_disk() <= cache.budget
    assert len(downloads) == 12  # two entries fit, and a loop of six evicts each before it comes round again
    cache.fetch(*items[-1])
    assert len(downloads) == 12  # the one fetched last was kept
    assert not [p for p in (tmp_path / "local").iterdir() if ".tmp-" in p.name]


def test_entries_in_use_elsewhere_are_not_evicted_and_over_budget_is_bounded(bucket, tmp_path):
    items, _ = shards(bucket, 4)
    reader = LocalCopies(tmp_path / "local")
    held = reader.fetch(*items[0])  # another reader's current shard: its lock is held through its own handle
    other = LocalCopies(tmp_path / "local", budget=int(1.5 * SHARD))
    for item in items[1:]:
        other.fetch(*item)
        assert held.exists()  # never evicted, though least recently used
        assert other.bytes_on_disk() <= other.budget + 2 * SHARD  # over by the entries in use only
    reader.close()
    other.fetch(*items[1])
    assert not held.exists() and other.bytes_on_disk() == 2 * SHARD  # let go of: evicted at last


def test_a_shard_larger_than_the_budget_is_a_one_line_error(bucket, tmp_path, downloads):
    url, sha, size = put(bucket, "big.arrow", os.urandom(5000))
    with pytest.raises(LocalCopiesFullError) as error:
        LocalCopies(tmp_path / "local", budget=1000).fetch(url, sha, size)
    assert str(error.value) == (f"cache.local_bytes 1000 is smaller than shard {url} (5000 bytes); "
                                "raise cache.local_bytes")
    assert isinstance(error.value, ValueError) and downloads == []


FETCH_IN_A_PROCESS = """
import hashlib, pathlib, sys, time
from storage.remote import fs as remote
from storage.remote.copies import LocalCopies

directory, url, sha, size, log, ready = sys.argv[1:]
real = remote.download_verified

def slow(url, dest, sha256):
    with open(log, "a") as handle:
        handle.write("download\\n")
    time.sleep(0.5)  # long enough for the other process to ask for the shard meanwhile
    return real(url, dest, sha256)

remote.download_verified = slow
pathlib.Path(ready, str(time.time())).touch()
while len(list(pathlib.Path(ready).iterdir())) < 2:  # start together
    time.sleep(0.002)
start = time.time()
path = LocalCopies(pathlib.Path(directory)).fetch(url, sha, int(size))
print(start, time.time(), hashlib.sha256(path.read_bytes()).hexdigest())
"""


def test_two_processes_share_one_download(bucket, tmp_path):
    url, sha, size = put(bucket, "s.arrow", data := os.urandom(200_000))
    directory, log, ready = tmp_path / "local", tmp_path / "downloads.log", tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", FETCH_IN_A_PROCESS, str(directory), url, sha, str(size), str(log), str(ready)]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    entry = directory / f"{sha}.arrow"
    while any(p.poll() is None for p in procs):  # whatever is visible under the entry's name is whole
        if entry.exists():
            assert entry.read_bytes() == data
        time.sleep(0.005)
    results = [p.communicate(timeout=30) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    (start_a, end_a, sha_a), (start_b, end_b, sha_b) = [out.split() for out, _ in results]
    assert sha_a == sha_b == sha
    assert max(float(start_a), float(start_b)) < min(float(end_a), float(end_b))  # asked while one downloaded
    assert log.read_text() == "download\n"
    assert files(directory) == sorted([f"{sha}.arrow", f".locks/{sha}.lock", ".locks/evict.lock"])


def test_prefetch_downloads_ahead_within_the_budget(bucket, tmp_path, downloads):
    items, originals = shards(bucket, 4)
    broken = put(bucket, "broken.arrow", os.urandom(SHARD))
    put(bucket, "broken.arrow", os.urandom(SHARD))
    cache = LocalCopies(tmp_path / "local")
    cache.prefetch([broken, *items[:3]])  # the broken one is skipped quietly
    deadline = time.monotonic() + 5
    while cache.bytes_on_disk() < 3 * SHARD and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(downloads) == 4
    for url, sha, size in items[:3]:
        assert cache.fetch(url, sha, size).read_bytes() == originals[url]
    assert len(downloads) == 4  # all three came from the prefetch
    with pytest.raises(ChecksumError, match=broken[0]):
        cache.fetch(*broken)
    cache.close()

    small = LocalCopies(tmp_path / "small", budget=int(3.5 * SHARD))  # a prefetch leaves room for one more shard
    small.fetch(*items[0])
    small.prefetch(items[1:])
    deadline = time.monotonic() + 5
    while small._queue and time.monotonic() < deadline:  # until the thread has taken up the last one
        time.sleep(0.01)
    small.close()  # waits for the thread to finish with it
    assert len(downloads) == 7 and downloads[-1] == items[1][0]  # the next would not fit beside the two with room for one more
    assert small.bytes_on_disk() == 2 * SHARD  # fetched last and the one prefetched, neither of which may go


def test_a_used_cache_pickles_and_works_in_the_copy(bucket, tmp_path, downloads):
    items, originals = shards(bucket, 2)
    cache = LocalCopies(tmp_path / "local", budget=3 * SHARD)
    cache.fetch(*items[0])
    cache.prefetch(items[1:])  # a thread and lock handles exist now
    copy = pickle.loads(pickle.dumps(cache))
    assert (copy.directory, copy.budget) == (cache.directory, cache.budget)
    for url, sha, size in items:
        assert copy.fetch(url, sha, size).read_bytes() == originals[url]
    copy.prefetch(items)
    copy.close()
    cache.close()
    assert len(downloads) == 2


def test_what_killed_downloads_left_is_removed_and_live_downloads_are_counted(bucket, tmp_path):
    """A download killed with ``kill -9`` leaves its temporary and its lock file (holding the bytes it reserved);
    a live one holds its lock. The next room-making removes the first and counts the second."""
    items, _ = shards(bucket, 2)
    directory = tmp_path / "local"
    cache = LocalCopies(directory, budget=int(2.5 * SHARD))
    cache.fetch(*items[0])
    cache.close()  # no longer in use: it may go
    dead, live = "d" * 64, "e" * 64
    for sha in (dead, live):
        (directory / f".{sha}.arrow.tmp-999-0badf00d").write_bytes(b"x" * 100)
        (directory / ".locks" / f"{sha}.lock").write_text(f"{SHARD}\n")
    with open(directory / ".locks" / f"{live}.lock") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # a download in flight elsewhere
        cache.fetch(*items[1])
        assert cache.bytes_on_disk() == SHARD  # its own shard went to make room beside the live reservation
    assert files(directory) == sorted([f".{live}.arrow.tmp-999-0badf00d", f".locks/{live}.lock",
                                       f".locks/{items[1][1]}.lock", f"{items[1][1]}.arrow", ".locks/evict.lock"])


def test_a_forked_child_makes_its_own_thread_and_locks(bucket, tmp_path, downloads):
    items, originals = shards(bucket, 3)
    cache = LocalCopies(tmp_path / "local")
    cache.fetch(*items[0])
    cache.prefetch(items[1:2])  # the parent's thread and lock handles exist now
    pid = os.fork()
    if pid == 0:  # the child: its fetch, prefetch and close must not touch the parent's thread or locks
        code = 1
        try:
            cache.prefetch(items[2:])
            code = 0 if cache.fetch(*items[2]).read_bytes() == originals[items[2][0]] else 1
            cache.close()
        finally:
            os._exit(code)
    deadline = time.monotonic() + 10
    while not (done := os.waitpid(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    if not done[0]:  # stuck, on a mutex or a thread inherited from the parent
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert done[0] and os.waitstatus_to_exitcode(done[1]) == 0
    assert cache.fetch(*items[1]).read_bytes() == originals[items[1][0]]
    cache.close()
    assert cache.bytes_on_disk() == 3 * SHARD
