"""Stored soft targets match a direct transformers forward, for both backends and both modes."""
from __future__ import annotations

import numpy as np
import pyarrow.ipc as ipc
import pytest
import torch
import zarr
from helpers import cache, cache_args, read_all
from transformers import AutoModelForCausalLM

from pipeline.cache.reduce import sample_targets, sequence_uniforms
from pipeline.demo.init_model import build_model
from storage.describe import format_summary, summarize
from storage.manifest import read_manifest
from storage.remote.store import open_cache


def reference_logits(model_dir, input_ids: np.ndarray) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(input_ids, dtype=torch.long)).logits.float()


def assert_topk_parity(model_dir, shard: dict, temperature: float) -> None:
    """Stored ids are a top-k of the reference (near-ties may swap), ascending, with matching log-probs and tail."""
    logits = reference_logits(model_dir, shard["input_ids"]) / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    k = shard["topk_ids"].shape[-1]
    want_lp, want_ids = logprobs.topk(k, dim=-1)
    stored_ids = torch.tensor(shard["topk_ids"], dtype=torch.long)
    assert (stored_ids.numpy() == np.sort(want_ids.numpy(), axis=-1)).mean() > 0.99
    assert np.all(np.diff(shard["topk_ids"], axis=-1) > 0)
    at_stored = logprobs.gather(-1, stored_ids)
    assert torch.all(at_stored.min(-1).values >= want_lp[..., -1] - 1e-5)
    stored_lp = shard["topk_logprobs"].astype(np.float32)
    np.testing.assert_allclose(stored_lp, at_stored.numpy(), rtol=2e-3, atol=2e-3)
    want_tail = torch.log1p(-want_lp.exp().sum(-1).clamp(max=1.0)).numpy()
    np.testing.assert_allclose(shard["tail_logprob"], want_tail, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
def test_topk_matches_transformers_forward(tmp_path, llama_dir, corpus_jsonl, fmt):
    directory = cache(cache_args(llama_dir, corpus_jsonl, tmp_path / "c", **{"cache.format": fmt,
                                                                             "cache.temperature": 2.0})).directory
    shards = read_all(directory)
    assert {s.split("-")[0] for s in shards} == {"train", "eval"}
    for shard in list(shards.values())[:2]:
        assert_topk_parity(llama_dir, shard, temperature=2.0)


def test_gpt2_and_backends_agree(tmp_path, gpt2_dir, corpus_jsonl):
    arrow = read_all(cache(cache_args(gpt2_dir, corpus_jsonl, tmp_path / "a", **{"cache.format": "arrow"})).directory)
    zarr_ = read_all(cache(cache_args(gpt2_dir, corpus_jsonl, tmp_path / "z", **{"cache.format": "zarr"})).directory)
    assert [p.rsplit(".", 1)[0] for p in arrow] == [p.rsplit(".", 1)[0] for p in zarr_]
    for a, z in zip(arrow.values(), zarr_.values()):
        for name in a:
            np.testing.assert_array_equal(a[name], z[name])
    assert_topk_parity(gpt2_dir, next(iter(arrow.values())), temperature=1.0)


def test_final_logit_softcapping_is_applied(tmp_path, tokenizer_dir, corpus_jsonl):
    model_dir = build_model(tokenizer_dir, tmp_path / "gemma2", arch="gemma2", hidden=32, layers=2, heads=2,
                            max_positions=256, final_logit_softcapping=0.5)
    directory = cache(cache_args(model_dir, corpus_jsonl, tmp_path / "c")).directory
    assert_topk_parity(model_dir, next(iter(read_all(directory).values())), temperature=1.0)


@pytest.mark.parametrize("fmt, sampler", [("arrow", "systematic"), ("zarr", "multinomial")])
def test_sample_mode_reproduces_from_teacher_forward(tmp_path, llama_dir, corpus_jsonl, fmt, sampler):
    args = cache_args(llama_dir, corpus_jsonl, tmp_path / "c", **{"cache.format": fmt, "cache.mode": "sample",
                                                                "cache.samples": 20, "cache.seed": 7,
                                                                "cache.sampler": sampler})
    directory = cache(args).directory
    manifest = read_manifest(directory)
    assert manifest.width == 20 and manifest.mode == "sample"
    summary = summarize(open_cache(directory))
    assert summary["sampler"] == sampler and f"sample ({sampler} draws)" in format_summary(summary)
    record = manifest.shards_for("train")[0]
    shard = read_all(directory)[record.path]
    logits = reference_logits(llama_dir, shard["input_ids"])
    seq_len = shard["input_ids"].shape[1]
    uniforms = torch.cat([sequence_uniforms(7, 0, i, seq_len, 20, sampler) for i in range(len(logits))])
    ids, logprobs, _ = sample_targets(logits.reshape(-1, logits.shape[-1]), uniforms, 1.0, 20)
    same = (ids.reshape(shard["topk_ids"].shape).numpy() == shard["topk_ids"]).mean()
    assert same > 0.999  # float rounding at a CDF boundary may move a rare draw
    assert np.all(np.isneginf(shard["tail_logprob"]))
    weights = np.exp(shard["topk_logprobs"].astype(np.float64)).sum(-1)
    np.testing.assert_allclose(weights, 1.0, atol=1e-2)
    padded = shard["topk_ids"] == -1
    assert np.all(np.isneginf(shard["topk_logprobs"][padded]))


def test_shards_read_with_plain_pyarrow_and_zarr(tmp_path, llama_dir, corpus_jsonl):
    a = cache(cache_args(llama_dir, corpus_jsonl, tmp_path / "a", **{"cache.format": "arrow"})).directory
    z = cache(cache_args(llama_dir, corpus_jsonl, tmp_path / "z", **{"cache.format": "zarr"})).directory
    first = read_manifest(a).shards[0]
    table = ipc.open_file(str(a / first.path)).read_all()
    assert table.column_names == ["input_ids", "loss_mask", "head_id_delta_b0", "head_id_delta_b1",
                                  "head_logprob_b0", "head_logprob_b1", "tail_logprob", "token_role"]
    assert list(read_manifest(a).dtypes) == table.column_names
    assert table.num_rows == first.sequences
    group = zarr.open_group(str(z / read_manifest(z).shards[0].path), mode="r")
    assert group["head_id_delta_b0"].shape == (first.sequences, 64, 8)
    assert group["input_ids"].dtype == np.uint16  # a 512-entry vocabulary fits; see storage/layout.py
    plane = np.array(table.column("head_id_delta_b0").to_pylist(), dtype=np.uint8)
    np.testing.assert_array_equal(plane, group["head_id_delta_b0"][...])
    roles = np.array(table.column("token_role").to_pylist(), dtype=np.uint8)
    np.testing.assert_array_equal(roles, group["token_role"][...])
    every = np.concatenate([np.array(ipc.open_file(str(a / s.path)).read_all().column("token_role").to_pylist())
                            for s in read_manifest(a).shards]).ravel()
    assert set(np.unique(every)) == {0, 1, 2}  # text, document ends and the final padding


def test_ids_above_65535_round_trip(tmp_path, tokenizer_dir, corpus_jsonl):
    model_dir = build_model(tokenizer_dir, tmp_path / "wide", arch="llama", hidden=16, layers=1, heads=2,
                            max_positions=128, vocab_size=70_000)
    for fmt in ("arrow", "zarr"):
        # A few thousand tokens suffice: a random 70,000-entry teacher puts ids above 65535 in the first shard.
        directory = cache(cache_args(model_dir, corpus_jsonl, tmp_path / fmt,
                                     **{"cache.format": fmt, "data.max_tokens": 2048})).directory
        manifest = read_manifest(directory)
        assert manifest.vocab_size == 70_000 and manifest.tokenizer["length"] == 512
        shard = next(iter(read_all(directory).values()))
        assert shard["topk_ids"].max() > 65535
        assert_topk_parity(model_dir, shard, temperature=1.0)


def test_hybrid_mode_reproduces_from_teacher_forward(tmp_path, llama_dir, corpus_jsonl):
    from pipeline.cache.reduce import hybrid_targets

    args = cache_args(llama_dir, corpus_jsonl, tmp_path / "c", **{"cache.mode": "hybrid", "cache.top_k": 4,
                                                                "cache.samples": 12})
    directory = cache(args).directory
    manifest = read_manifest(directory)
    assert manifest.width == 16 and manifest.top_k == 4 and manifest.samples == 12
    shard = read_all(directory)[manifest.shards_for("train")[0].path]
    logits = reference_logits(llama_dir, shard["input_ids"])
    seq_len = shard["input_ids"].shape[1]
    uniforms = torch.cat([sequence_uniforms(0, 0, i, seq_len, 12, "multinomial") for i in range(len(logits))])
    ids, _, _ = hybrid_targets(logits.reshape(-1, logits.shape[-1]), 4, uniforms, 1.0)
    want = ids.reshape(shard["topk_ids"].shape).numpy()
    want[..., :4] = np.sort(want[..., :4], axis=-1)  # readers return the head by ascending id
    assert (want == shard["topk_ids"]).mean() > 0.999
    weights = np.exp(shard["topk_logprobs"].astype(np.float64)).sum(-1)
    np.testing.assert_allclose(weights, 1.0, atol=1e-2)
