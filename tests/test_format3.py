"""Format 3 end to end: plain readers load a 70k-vocabulary cache as one table, format 2 trains to the same
bits, and caches written by the format-2 release still read."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from helpers import cache, cache_args, read_all, train, train_args
from safetensors.torch import load_file

from pipeline.demo.init_model import build_model
from storage.codec.layout import Layout
from storage.codec.v3 import delta_decode, join_planes
from storage.describe import summarize
from storage.manifest import read_manifest
from storage.read.reader import sequential_batches
from storage.remote.store import open_cache

FIXTURES = Path(__file__).parent / "data"
FORMAT_PAGE = FIXTURES.parent.parent / "docs" / "format.md"


@pytest.fixture(scope="module")
def wide_model(tokenizer_dir, tmp_path_factory):
    """A random teacher with 70,000 outputs: ids above 65,535 are common in its targets."""
    return build_model(tokenizer_dir, tmp_path_factory.mktemp("wide"), arch="llama", hidden=16, layers=1, heads=2,
                       max_positions=64, vocab_size=70_000)


def plain_decode(columns: dict, manifest) -> tuple[np.ndarray, np.ndarray]:
    """Ids and log-probs of a top-k cache's columns as numpy arrays, (n, T, K)."""
    layout = Layout.of(manifest)
    ids = delta_decode(join_planes(columns, "head_id_delta", layout.id_dtype))
    return ids, join_planes(columns, "head_logprob", np.float16).astype(np.float32)


def test_datasets_and_pyarrow_read_a_vocab_70k_cache_as_one_table(tmp_path, wide_model, corpus_jsonl):
    """Top-1 of a random 70,000-entry teacher over 8-token sequences, one per shard: some shards hold only ids
    below 65,535 and some higher ones; format 2 gave them different schemas."""
    import datasets

    directory = cache(cache_args(wide_model, corpus_jsonl, tmp_path / "c", **{
        "cache.top_k": 1, "data.seq_len": 8, "cache.shard_size": 1, "data.max_tokens": 240})).directory
    manifest = read_manifest(directory)
    files = [str(directory / r.path) for r in manifest.shards_for("train")]
    shards = read_all(directory)
    highest = [shards[r.path]["topk_ids"].max() for r in manifest.shards_for("train")]
    assert min(highest) < 65535 < max(highest)
    want_ids = np.concatenate([shards[r.path]["topk_ids"] for r in manifest.shards_for("train")])
    want_lp = np.concatenate([shards[r.path]["topk_logprobs"] for r in manifest.shards_for("train")])

    loaded = datasets.load_dataset("arrow", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == len(want_ids) == len(files)
    columns = {name: np.asarray(loaded.with_format("numpy")[name]) for name in loaded.column_names}
    for got in (columns, {name: np.asarray(col.to_pylist())
                          for name, col in zip(*_table_columns(pads.dataset(files, format="ipc").to_table()))}):
        ids, logprobs = plain_decode(got, manifest)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(logprobs, want_lp)


def _table_columns(table):
    return table.column_names, table.columns


def _final_weights(tmp_path, cache_dir, name):
    final = train(train_args(cache_dir, tmp_path / name, **{"train.steps": 6, "train.eval_every": 0}))
    return load_file(final / "model.safetensors")


@pytest.mark.parametrize("mode", ["sample", "hybrid"])
def test_format2_and_format3_caches_train_to_bitwise_equal_students(tmp_path, llama_dir, corpus_jsonl, mode):
    settings = {"cache.mode": mode, "cache.samples": 12, "cache.top_k": 3}
    caches = {v: cache(cache_args(llama_dir, corpus_jsonl, tmp_path / f"v{v}", **settings,
                                  **{"cache.format_version": v})).directory for v in (2, 3)}
    manifests = {v: read_manifest(d) for v, d in caches.items()}
    assert manifests[2].format_version == 2 and "topk_logprobs" in manifests[2].dtypes
    assert manifests[3].format_version == 3 and "sample_count" in manifests[3].dtypes
    if mode == "sample":  # hybrid's nine columns cost more fixed bytes than format 2's five in these 5 KB shards
        assert manifests[3].bytes < manifests[2].bytes
    a, b = (_final_weights(tmp_path, caches[v], f"student-v{v}") for v in (2, 3))
    assert a.keys() == b.keys()
    assert all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)


@pytest.mark.parametrize("name", ["format2-hybrid-arrow", "format2-topk-zarr"])
def test_a_cache_written_by_the_format2_release_still_reads_and_trains(tmp_path, name):
    directory = shutil.copytree(FIXTURES / name, tmp_path / name)
    manifest = read_manifest(directory)
    assert manifest.format_version == 2 and open_cache(directory).verify() == []
    # That release drew multinomially and did not name it; top-k caches draw nothing.
    assert summarize(open_cache(directory))["sampler"] == ("multinomial" if manifest.mode == "hybrid" else None)
    head = manifest.top_k
    for batch in sequential_batches(directory, "train", 8):
        ids, logprobs = batch["topk_ids"].numpy(), batch["topk_logprobs"].numpy()
        assert ids.shape[-1] == manifest.width and ids.max() < manifest.vocab_size
        assert np.all(np.diff(ids[..., :head], axis=-1) > 0)  # the head by ascending id, as format 3 reads
        if manifest.mode == "hybrid":
            np.testing.assert_allclose(np.exp(logprobs.astype(np.float64)).sum(-1), 1.0, atol=1e-2)
            assert np.array_equal(ids[..., head:] < 0, np.isneginf(logprobs[..., head:]))
        else:
            mass = np.exp(logprobs.astype(np.float64)).sum(-1) + np.exp(batch["tail_logprob"].numpy())
            np.testing.assert_allclose(mass, 1.0, atol=1e-2)
    final = train(train_args(directory, tmp_path / "student", **{"train.steps": 2, "train.eval_every": 0}))
    assert (final / "model.safetensors").is_file()


def documented_reader():
    """The numpy reader shown in docs/format.md, executed as written."""
    text = FORMAT_PAGE.read_text()
    code = text.split("<!-- numpy-reader -->\n```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(code, str(FORMAT_PAGE), "exec"), scope)
    return scope["read_shard"]


@pytest.mark.parametrize("mode", ["topk", "sample", "hybrid"])
def test_the_documented_readers_match_distillery(tmp_path, wide_model, corpus_jsonl, mode):
    directory = cache(cache_args(wide_model, corpus_jsonl, tmp_path / "c", **{
        "cache.mode": mode, "cache.top_k": 3, "cache.samples": 300, "data.max_tokens": 1024})).directory
    read_shard = documented_reader()
    for path, want in read_all(directory).items():
        ids, logprobs, tail = read_shard(directory, path)
        np.testing.assert_array_equal(ids, want["topk_ids"])
        np.testing.assert_allclose(logprobs, want["topk_logprobs"], rtol=1e-3, atol=1e-3)  # ours: fp16-rounded
        np.testing.assert_array_equal(tail, want["tail_logprob"])
    snippet = FORMAT_PAGE.read_text().split("<!-- storage-reader -->\n```python\n", 1)[1]
    scope = {"directory": directory}
    exec(compile(snippet.split("```", 1)[0], str(FORMAT_PAGE), "exec"), scope)
    train_shards = {path: arrays for path, arrays in read_all(directory).items() if path.startswith("train-")}
    assert scope["shards"].keys() == train_shards.keys() and train_shards
    for path, arrays in train_shards.items():
        assert all(np.array_equal(scope["shards"][path][name], arrays[name]) for name in arrays)
