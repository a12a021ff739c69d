"""The streaming reader: deterministic order, rank and worker splits, resume, bounded memory, checksums."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import cache, cache_args
from torch.utils.data import DataLoader

from storage.errors import ChecksumError
from storage.manifest import read_manifest
from storage.read.reader import SoftTargetStream, sequential_batches
from storage.read.stream import ShardRows, StreamOrder, StreamState, epoch_order, micro_batch_samples


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, llama_dir, corpus_jsonl):
    directory = tmp_path_factory.mktemp("stream") / "cache"
    return cache(cache_args(llama_dir, corpus_jsonl, directory, **{"data.seq_len": 32, "cache.shard_size": 5})).directory


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_epoch_order_is_a_seeded_permutation():
    sizes = [5, 3, 7, 1]
    a = epoch_order(sizes, seed=1, epoch=0, shuffle_buffer=4)
    assert sorted(a.tolist()) == list(range(16))
    assert np.array_equal(a, epoch_order(sizes, seed=1, epoch=0, shuffle_buffer=4))
    assert not np.array_equal(a, epoch_order(sizes, seed=1, epoch=1, shuffle_buffer=4))
    assert not np.array_equal(a, epoch_order(sizes, seed=2, epoch=0, shuffle_buffer=4))


@pytest.mark.parametrize("world,accum", [(1, 4), (2, 2), (4, 1)])
def test_a_step_takes_the_same_samples_whatever_the_world_size(world, accum):
    """Rank-major, then micro-batch order, the micro-batches of a step are one run of the epoch's order."""
    order = epoch_order([7, 30, 11], seed=0, epoch=0, shuffle_buffer=8)
    for step in range(3):
        taken = [micro_batch_samples(order, step * accum + m, StreamOrder(2, rank=r, world_size=world, grad_accum=accum))
                 for r in range(world) for m in range(accum)]
        assert np.array_equal(np.concatenate(taken), order[step * 8 : (step + 1) * 8])


def test_shard_rows_keep_at_most_max_open_shards():
    loads = []

    def load(i):
        loads.append(i)
        return {"x": np.full((4, 2), i)}

    rows = ShardRows(load, [4, 4, 4, 4], max_open=2)
    out = rows.gather(np.array([0, 5, 9, 13, 1]))
    assert out["x"][:, 0].tolist() == [0, 1, 2, 3, 0]
    assert len(rows._open) == 2 and loads == [0, 1, 2, 3]  # each shard touched by a batch is read once


def test_stream_yields_typed_batches(cache_dir):
    batch = next(iter(SoftTargetStream(cache_dir, StreamOrder(3))))
    assert batch["input_ids"].shape == (3, 32) and batch["input_ids"].dtype == torch.int64
    assert batch["topk_ids"].shape == (3, 32, 8) and batch["topk_ids"].dtype == torch.int64
    assert batch["topk_logprobs"].dtype == torch.float32 and batch["tail_logprob"].shape == (3, 32)
    assert batch["loss_mask"].dtype == torch.bool


def test_resume_state_continues_exactly(cache_dir):
    order = StreamOrder(2, seed=3, shuffle_buffer=4)
    stream = SoftTargetStream(cache_dir, order)
    per_epoch = stream.steps_per_epoch
    full = take(iter(stream), per_epoch + 3)  # crosses an epoch boundary
    state = StreamState((per_epoch - 2) * order.global_batch)
    restored = StreamState(**json.loads(json.dumps(state.__dict__)))  # as a checkpoint's state.json stores it
    resumed = take(iter(SoftTargetStream(cache_dir, order, start=restored)), 5)
    for a, b in zip(full[per_epoch - 2 :], resumed, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["topk_ids"], b["topk_ids"])
        assert torch.equal(a["sample_index"], b["sample_index"])


def test_order_does_not_depend_on_worker_count(cache_dir):
    """Five micro-batches an epoch, dealt to two workers: the deal must stay in step across epochs."""
    total = sum(s.sequences for s in read_manifest(cache_dir).shards_for("train"))
    stream = SoftTargetStream(cache_dir, StreamOrder(total // 5, seed=5))
    assert stream.steps_per_epoch == 5
    plain = take(iter(DataLoader(stream, batch_size=None, num_workers=0)), 12)
    workers = take(iter(DataLoader(stream, batch_size=None, num_workers=2)), 12)
    assert all(torch.equal(a["sample_index"], b["sample_index"]) for a, b in zip(plain, workers, strict=True))
    assert not torch.equal(plain[0]["sample_index"], plain[5]["sample_index"])  # epoch 1 has its own order


def test_ranks_see_disjoint_samples_and_equal_steps(cache_dir):
    streams = [SoftTargetStream(cache_dir, StreamOrder(2, rank=r, world_size=2)) for r in range(2)]
    assert streams[0].steps_per_epoch == streams[1].steps_per_epoch > 0
    seen = [set() for _ in streams]
    for r, stream in enumerate(streams):
        for batch in take(iter(stream), stream.steps_per_epoch):
            seen[r] |= {tuple(row.tolist()) for row in batch["input_ids"]}
    assert not seen[0] & seen[1]


def test_corrupt_shard_is_caught_on_first_open(cache_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cache_dir, copy)
    first = read_manifest(copy).shards_for("train")[0].path
    data = bytearray((copy / first).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / first).write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=first):
        list(sequential_batches(copy, "train", 4))


def test_sequential_eval_pass_covers_the_split(cache_dir):
    total = sum(s.sequences for s in read_manifest(cache_dir).shards_for("eval"))
    assert sum(len(b["input_ids"]) for b in sequential_batches(cache_dir, "eval", 3)) == total
