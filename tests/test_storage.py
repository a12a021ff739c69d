"""One conformance suite for both shard backends, plus atomic writes, checksums and partitions."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import make_targets

from storage.backends import BACKENDS, get_backend
from storage.codec.layout import Layout
from storage.errors import ShardSchemaError
from storage.io.atomic import atomic_write
from storage.io.hashing import tree_sha256
from storage.write.parts import num_parts, part_index, shards_of_part

LAYOUTS = [Layout(3, "topk", 300_000, 3, 0), Layout(3, "sample", 65_535, 0, 4, samples=6),
           Layout(3, "hybrid", 512, 2, 3, samples=300, logprob_bits=8), Layout(2, "hybrid", 300_000, 2, 3, samples=6)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"v{lay.version}-{lay.mode}-{lay.vocab_size}")
@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_round_trip_is_exact(tmp_path, name, layout):
    fmt = get_backend(name)
    columns = layout.encode(make_targets(layout))
    path = tmp_path / f"s{fmt.suffix}"
    fmt.write(path, columns, level=3)
    back = fmt.read(path)
    assert list(back) == list(columns)
    for key, value in columns.items():
        assert back[key].dtype == value.dtype
        np.testing.assert_array_equal(back[key], value)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporaries left


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_write_is_deterministic_and_hash_detects_changes(tmp_path, name):
    backend, layout = get_backend(name), LAYOUTS[0]
    a, b = tmp_path / f"a{backend.suffix}", tmp_path / f"b{backend.suffix}"
    backend.write(a, layout.encode(make_targets(layout)), level=3)
    backend.write(b, layout.encode(make_targets(layout)), level=3)
    assert tree_sha256(a) == tree_sha256(b)
    backend.write(b, layout.encode(make_targets(layout, seed=1)), level=3)
    assert tree_sha256(a) != tree_sha256(b)


def test_a_folder_hashes_alike_on_disk_and_behind_a_url_in_path_order(tmp_path):
    """One digest for a folder, local or remote: files in path order (``a/x`` before ``a.b``, though ``.`` sorts
    before ``/`` as text), each as its relative path, NUL and its bytes."""
    import hashlib

    import fsspec

    folder = tmp_path / "shard"
    for name, data in {"a/x": b"one", "a.b": b"two", "z": b""}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    want = hashlib.sha256(b"a/x\0one" b"a.b\0two" b"z\0").hexdigest()
    assert tree_sha256(folder) == want
    memory = fsspec.filesystem("memory")
    memory.put(str(folder), "/copy", recursive=True)
    assert tree_sha256("/copy", memory) == want
    assert tree_sha256(folder / "a.b") == hashlib.sha256(b"two").hexdigest()  # a file: its bytes, as sha256sum


def test_encoding_rejects_bad_targets_with_every_problem():
    layout = LAYOUTS[2]
    targets = make_targets(layout)
    targets["head_logprobs"] = targets["head_logprobs"].astype(np.float16)
    targets["tail_logprob"] = targets["tail_logprob"][:, :3]
    del targets["sample_counts"]
    with pytest.raises(ShardSchemaError, match=r"missing fields \['sample_counts'\]"):
        layout.encode(targets)
    targets["sample_counts"] = np.zeros_like(targets["sample_ids"])
    with pytest.raises(ShardSchemaError, match="head_logprobs has dtype float16.*tail_logprob has shape"):
        layout.encode(targets)


def test_unknown_format_is_named():
    with pytest.raises(ValueError, match="unknown shard format 'parquet'"):
        get_backend("parquet")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


@pytest.mark.parametrize("shards,tasks,world", [(10, 1, 1), (10, 3, 1), (7, 2, 2), (3, 2, 4), (100, 4, 8)])
def test_partition_is_disjoint_and_covering(shards, tasks, world):
    parts = num_parts(tasks, world)
    seen = []
    for task in range(tasks):
        for rank in range(world):
            mine = shards_of_part(shards, part_index(task, tasks, rank, world), parts)
            assert mine == sorted(mine)
            seen.extend(mine)
    assert sorted(seen) == list(range(shards))


def test_partition_rejects_out_of_range_indices():
    with pytest.raises(ValueError, match="task index 2"):
        part_index(2, 2, 0, 1)
    with pytest.raises(ValueError, match="rank 1"):
        part_index(0, 1, 1, 1)


def test_threaded_writer_writes_the_same_shards_as_one_thread(tmp_path):
    from storage.write.background import BackgroundShardWriter
    from storage.write.cache import CacheDirectory
    from storage.write.folder import ShardPlan

    hashes = []
    for threads in (1, 3):
        directory = tmp_path / f"t{threads}"
        directory.mkdir()
        writer = BackgroundShardWriter(CacheDirectory(directory, "fp"), get_backend("arrow"), LAYOUTS[1], 3,
                                       depth=threads + 1, threads=threads)
        for index in range(7):
            writer.submit(ShardPlan("train", index, index * 5, 5, ".arrow"), make_targets(LAYOUTS[1], seed=index))
        writer.close()
        hashes.append({p.name: tree_sha256(p) for p in directory.iterdir()})
    assert len(hashes[0]) == 14 and hashes[0] == hashes[1]


def _manifest_listing(directory, path: str) -> None:
    from storage.manifest import Manifest, ShardRecord, write_manifest

    directory.mkdir(exist_ok=True)
    write_manifest(directory, Manifest(shards=[ShardRecord(path, "train", 1, 1, 1, "0" * 64)]))


@pytest.mark.parametrize("escape", ["../outside.arrow", "/etc/passwd", "shards/../../outside.arrow"])
def test_manifest_paths_outside_the_cache_are_refused(tmp_path, escape):
    from storage.errors import ManifestError
    from storage.manifest import read_manifest

    _manifest_listing(tmp_path / "cache", escape)
    with pytest.raises(ManifestError, match="is not inside the cache directory"):
        read_manifest(tmp_path / "cache")


def test_a_shard_symlinked_outside_the_cache_is_refused(tmp_path, capsys):
    from pipeline import cli

    (tmp_path / "outside.arrow").write_bytes(b"not yours")
    _manifest_listing(tmp_path / "cache", "train-00000.arrow")
    (tmp_path / "cache" / "train-00000.arrow").symlink_to(tmp_path / "outside.arrow")
    assert cli.main(["verify", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip()
    assert "leads outside the cache directory" in err and len(err.splitlines()) == 1
