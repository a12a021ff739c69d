"""One conformance suite for both shard backends, plus atomic writes, checksums and partitions."""
from __future__ import annotations

import numpy as np
import pytest

from storage.atomic import atomic_write
from storage.errors import ShardSchemaError
from storage.formats import FORMATS, get_format
from storage.manifest import shard_sha256
from storage.partition import num_parts, part_index, shards_of_part


def make_arrays(n=5, seq_len=7, width=3, seed=0, vocab=300_000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    logprobs = rng.normal(-3, 1, (n, seq_len, width)).astype(np.float16)
    logprobs[0, 0, -1] = -np.inf
    ids = rng.integers(0, vocab, (n, seq_len, width), dtype=np.int32)
    ids[0, 0, -1] = -1
    return {
        "input_ids": rng.integers(0, vocab, (n, seq_len), dtype=np.int32),
        "topk_ids": ids,
        "topk_logprobs": logprobs,
        "tail_logprob": np.log(rng.uniform(0, 1, (n, seq_len))).astype(np.float32),
        "loss_mask": rng.integers(0, 2, (n, seq_len), dtype=np.uint8),
    }


@pytest.mark.parametrize("vocab", [300_000, 65_535])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_round_trip_is_exact(tmp_path, name, vocab):
    fmt = get_format(name)
    arrays = make_arrays(vocab=vocab)
    arrays["topk_ids"][1, 1, 1] = vocab - 1
    path = tmp_path / f"s{fmt.suffix}"
    fmt.write(path, arrays, level=3)
    back = fmt.read(path)
    assert set(back) == set(arrays)
    for key, value in arrays.items():
        assert back[key].dtype == value.dtype
        np.testing.assert_array_equal(back[key], value)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporaries left


def test_ids_below_65535_are_stored_as_uint16_with_padding_65535(tmp_path):
    import pyarrow.ipc as ipc
    import zarr

    arrays = make_arrays(vocab=65_535)
    get_format("arrow").write(tmp_path / "s.arrow", arrays, level=3)
    get_format("zarr").write(tmp_path / "s.zarr", arrays, level=3)
    table = ipc.open_file(str(tmp_path / "s.arrow")).read_all()
    stored = np.array(table.column("topk_ids").to_pylist())
    assert str(table.schema.field("input_ids").type.value_type) == "uint16"
    assert stored[0, 0, -1] == 65535 and stored.max() == 65535
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert group["topk_ids"].dtype == np.uint16 and group["input_ids"].dtype == np.uint16
    np.testing.assert_array_equal(group["topk_ids"][...], stored)
    wide = make_arrays(vocab=300_000)
    get_format("zarr").write(tmp_path / "w.zarr", wide, level=3)
    assert zarr.open_group(str(tmp_path / "w.zarr"), mode="r")["topk_ids"].dtype == np.int32


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_write_is_deterministic_and_hash_detects_changes(tmp_path, name):
    fmt = get_format(name)
    a, b = tmp_path / f"a{fmt.suffix}", tmp_path / f"b{fmt.suffix}"
    fmt.write(a, make_arrays(), level=3)
    fmt.write(b, make_arrays(), level=3)
    assert shard_sha256(a) == shard_sha256(b)
    fmt.write(b, make_arrays(seed=1), level=3)
    assert shard_sha256(a) != shard_sha256(b)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_writer_rejects_bad_arrays_with_every_problem(tmp_path, name):
    arrays = make_arrays()
    arrays["topk_logprobs"] = arrays["topk_logprobs"].astype(np.float32)
    arrays["tail_logprob"] = arrays["tail_logprob"][:, :3]
    with pytest.raises(ShardSchemaError, match="topk_logprobs has dtype float32.*tail_logprob has shape"):
        get_format(name).write(tmp_path / "bad", arrays, level=3)
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_is_named():
    with pytest.raises(ValueError, match="unknown shard format 'parquet'"):
        get_format("parquet")


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
    with pytest.raises(ValueError, match="shard index 2"):
        part_index(2, 2, 0, 1)
    with pytest.raises(ValueError, match="rank 1"):
        part_index(0, 1, 1, 1)


def test_threaded_writer_writes_the_same_shards_as_one_thread(tmp_path):
    from storage.shard_writer import BackgroundShardWriter
    from storage.writer import CacheDirectory, ShardPlan

    hashes = []
    for threads in (1, 3):
        directory = tmp_path / f"t{threads}"
        directory.mkdir()
        writer = BackgroundShardWriter(CacheDirectory(directory, "fp"), get_format("arrow"), 3, depth=threads + 1,
                                       threads=threads)
        for index in range(7):
            writer.submit(ShardPlan("train", index, index * 5, 5, ".arrow"), make_arrays(seed=index))
        writer.close()
        hashes.append({p.name: shard_sha256(p) for p in directory.iterdir()})
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
