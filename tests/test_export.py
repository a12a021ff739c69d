"""``distillery export``: a cache as a ``datasets`` folder or Parquet files whose every value is the reader's,
under the column mapping of ``storage.export`` (Axolotl's KD dataset columns)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import cache, cache_args

from pipeline import cli
from storage import export
from storage.export import ExportError, export_cache
from storage.manifest import read_manifest
from storage.read.reader import sequential_batches
from storage.remote.store import open_cache

ROOT = Path(__file__).resolve().parents[1]
TYPES = {"input_ids": "list<item: int32>", "attention_mask": "list<item: int8>", "labels": "list<item: int32>",
         "loss_mask": "list<item: uint8>", "target_token_ids": "list<item: list<item: int32>>",
         "target_logprobs": "list<item: list<item: float>>", "target_mask": "list<item: list<item: int8>>",
         "tail_logprob": "list<item: float>"}


@pytest.fixture(scope="module")
def hybrid_cache(llama_dir, corpus_jsonl, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("export") / "c"
    result = cache(cache_args(llama_dir, corpus_jsonl, directory,
                              **{"cache.mode": "hybrid", "cache.top_k": 3, "cache.samples": 8}))
    return Path(result.directory)


def reader_arrays(directory: Path, split: str = "train") -> dict[str, np.ndarray]:
    batches = list(sequential_batches(directory, split, 5))
    return {name: np.concatenate([b[name].numpy() for b in batches]) for name in batches[0]}


def expected_row(a: dict[str, np.ndarray], i: int) -> dict[str, list]:
    """Row ``i`` under the documented mapping, written out position by position."""
    ids, mask, seq_len = a["input_ids"][i].tolist(), a["loss_mask"][i].tolist(), len(a["input_ids"][i])
    labels = [-100] + [ids[j + 1] if mask[j] else -100 for j in range(seq_len - 1)]
    slot_ids, slot_lps, mask_rows = [], [], []
    for j in range(seq_len):
        row_ids, row_lps, row_mask = [], [], []
        for slot, lp in zip(a["topk_ids"][i, j].tolist(), a["topk_logprobs"][i, j].tolist()):
            row_ids.append(slot if slot >= 0 else 0)
            row_lps.append(lp if slot >= 0 and lp != -np.inf else -1e9)
            row_mask.append(int(slot >= 0 and lp != -np.inf and bool(mask[j])))
        slot_ids.append(row_ids), slot_lps.append(row_lps), mask_rows.append(row_mask)
    tail = [t if t != -np.inf else -1e9 for t in a["tail_logprob"][i].tolist()]
    return {"input_ids": ids, "attention_mask": [1] * seq_len, "labels": labels, "loss_mask": [int(m) for m in mask],
            "target_token_ids": slot_ids, "target_logprobs": slot_lps, "target_mask": mask_rows, "tail_logprob": tail}


def assert_rows_equal(rows: list[dict], a: dict[str, np.ndarray], first: int = 0) -> None:
    assert len(rows) > 0
    for offset, row in enumerate(rows):
        want = expected_row(a, first + offset)
        for name, value in want.items():
            got = np.asarray(row[name], dtype=np.float64)
            assert np.array_equal(got, np.asarray(value, dtype=np.float64)), f"row {first + offset} {name}"


def parquet_table(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))])


def test_hf_export_loads_and_equals_the_reader(hybrid_cache, tmp_path):
    import datasets

    summary = export_cache(hybrid_cache, tmp_path / "hf", "hf", progress=False)
    a = reader_arrays(hybrid_cache)
    n = len(a["input_ids"])
    manifest = read_manifest(hybrid_cache)
    assert summary["rows"] == n == manifest.splits["train"]["sequences"]
    assert summary["files"] == len(manifest.shards_for("train")) > 1
    assert summary["bytes"] == sum(p.stat().st_size for p in (tmp_path / "hf").iterdir())
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    assert len(ds) == n and {k: str(v) for k, v in zip(ds.data.schema.names, ds.data.schema.types)} == TYPES
    assert a["topk_ids"].shape[-1] == manifest.width == 11 and (a["topk_ids"] < 0).any()  # unused slots occur
    assert (a["loss_mask"] == 0).any() and np.isneginf(a["tail_logprob"]).all()  # hybrid: draws hold the tail
    assert_rows_equal(ds.to_list(), a)
    for name in ("target_logprobs", "tail_logprob"):
        values = ds.data.column(name).combine_chunks().flatten()
        values = values.flatten() if name == "target_logprobs" else values
        assert np.isfinite(values.to_numpy()).all()
    provenance = json.loads(ds.info.description)
    assert provenance["fingerprint"] == manifest.fingerprint and provenance["rows"] == n


def test_the_state_json_has_the_keys_save_to_disk_writes(hybrid_cache, tmp_path):
    """A guard against a ``datasets`` release that changes the folder layout ``export`` writes by hand."""
    import datasets

    export_cache(hybrid_cache, tmp_path / "hf", "hf", max_sequences=3, progress=False)
    datasets.Dataset.from_dict({"a": [1]}).save_to_disk(str(tmp_path / "ref"))
    ours, ref = (json.loads((tmp_path / d / "state.json").read_text()) for d in ("hf", "ref"))
    assert ours.keys() == ref.keys()
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {"state.json", "dataset_info.json",
                                                               "data-00000-of-00001.arrow"}


def test_parquet_export_equals_the_reader_and_is_zstd(hybrid_cache, tmp_path):
    summary = export_cache(hybrid_cache, tmp_path / "pq", "parquet", split="eval", progress=False)
    a = reader_arrays(hybrid_cache, "eval")
    files = sorted((tmp_path / "pq").iterdir())
    count = summary["files"]
    assert [p.name for p in files] == [f"data-{i:05d}-of-{count:05d}.parquet" for i in range(count)]
    table = parquet_table(tmp_path / "pq")
    assert {k: str(v).replace("element", "item") for k, v in zip(table.schema.names, table.schema.types)} == TYPES
    assert_rows_equal(table.to_pylist(), a)
    meta = pq.ParquetFile(files[0]).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert json.loads(pq.read_schema(files[0]).metadata[b"distillery"])["split"] == "eval"


def test_a_slice_exports_exactly_the_asked_rows(hybrid_cache, tmp_path):
    a = reader_arrays(hybrid_cache)
    summary = export_cache(hybrid_cache, tmp_path / "s", "parquet", start=5, max_sequences=7, progress=False)
    assert summary["rows"] == 7 and summary["files"] == 2  # rows 5..11 span the first two shards of 8
    assert_rows_equal(parquet_table(tmp_path / "s").to_pylist(), a, first=5)
    n = len(a["input_ids"])
    tail = export_cache(hybrid_cache, tmp_path / "t", "hf", start=n - 2, max_sequences=100, progress=False)
    ends = np.cumsum([r.sequences for r in read_manifest(hybrid_cache).shards_for("train")])
    assert tail["rows"] == 2 and tail["files"] == 1 + (ends[-2] == n - 1)  # one shard, or the last two
    import datasets

    assert_rows_equal(datasets.load_from_disk(str(tmp_path / "t")).to_list(), a, first=n - 2)


def test_a_url_cache_exports_the_same_rows(hybrid_cache, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the local shard copies of a URL cache
    (tmp_path / "tmp").mkdir()
    export_cache(f"file://{hybrid_cache}", tmp_path / "u", "parquet", max_sequences=9, progress=False)
    assert_rows_equal(parquet_table(tmp_path / "u").to_pylist(), reader_arrays(hybrid_cache))


def test_a_failed_export_leaves_nothing(hybrid_cache, tmp_path, monkeypatch):
    real = export._Files.write

    def fail_on_second(self, batches):
        if self.names:
            raise OSError("simulated crash")
        real(self, batches)

    monkeypatch.setattr(export._Files, "write", fail_on_second)
    with pytest.raises(OSError, match="simulated"):
        export_cache(hybrid_cache, tmp_path / "out", "hf", progress=False)
    assert list(tmp_path.iterdir()) == []


def one_error_line(capfd) -> str:
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    return captured.err


def test_cli_exports_and_refuses_bad_input_with_one_line(hybrid_cache, tmp_path, capfd):
    out = tmp_path / "out"
    assert cli.main(["-q", "export", str(hybrid_cache), "--out", str(out), "--format", "parquet",
                     "--max-sequences", "4"]) == 0
    printed = capfd.readouterr().out
    assert printed.count("\n") == 1 and "4 sequences" in printed and str(out) in printed
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    assert cli.main(["-q", "export", str(hybrid_cache), "--out", str(out)]) == 2
    err = one_error_line(capfd)
    assert f"--out {out} is a directory that is not empty" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    cases = [([str(tmp_path / "missing"), "--out", str(tmp_path / "o1")], f"{tmp_path / 'missing'}"),
             ([str(hybrid_cache), "--out", str(tmp_path / "o2"), "--split", "valid"], "no split 'valid'"),
             ([str(hybrid_cache), "--out", str(tmp_path / "o3"), "--start", "100000"], "--start 100000"),
             ([str(hybrid_cache), "--out", str(tmp_path / "o4"), "--max-sequences", "0"], "--max-sequences 0"),
             ([str(hybrid_cache), "--out", str(hybrid_cache), "--overwrite"], "is the cache")]
    for argv, named in cases:
        assert cli.main(["-q", "export", *argv]) == 2, argv
        assert named in one_error_line(capfd)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
    assert open_cache(hybrid_cache).verify() == []

    assert cli.main(["-q", "export", str(hybrid_cache), "--out", str(out), "--overwrite"]) == 0
    assert "data-00000-of-" in " ".join(p.name for p in out.iterdir()) and (out / "state.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_refuses_an_unknown_format(hybrid_cache, tmp_path):
    with pytest.raises(ExportError, match="--format 'csv'"):
        export_cache(hybrid_cache, tmp_path / "x", "csv")


def test_nothing_is_written_outside_out(hybrid_cache, tmp_path):
    """The ``datasets`` cache, HOME and the temp dir stay empty; out's parent holds out alone (progress bar on)."""
    home, temp, parent = tmp_path / "home", tmp_path / "tmp", tmp_path / "parent"
    for folder in (home, temp, parent):
        folder.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_"))}
    env |= {"HOME": str(home), "TMPDIR": str(temp), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "pipeline", "export", str(hybrid_cache), "--out",
                           str(parent / "out"), "--max-sequences", "10"], env=env, capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "export" in done.stderr  # the tqdm bar went to stderr
    assert list(home.rglob("*")) == [] and list(temp.rglob("*")) == []
    assert [p.name for p in parent.iterdir()] == ["out"]
