"""Where training batches come from: a finished cache, or packed raw text for ``pretrain``.

Both give the trainer the same things: a resumable training stream, a
held-out pass, the tokenizer, and the facts the loss needs.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.data import PackedSplit
from storage.manifest import read_manifest
from storage.reader import SoftTargetStream, sequential_batches, to_tensors
from storage.stream import StreamState, iterate_batches

Batch = dict[str, torch.Tensor]


@dataclass
class BatchSource:
    """A training stream factory plus everything the loop needs to know about the data."""

    stream: Callable[[StreamState], Iterator[Batch]]
    eval_batches: Callable[[], Iterator[Batch]] | None
    batches_per_epoch: int
    tokenizer: object
    vocab_size: int  # the cache teacher's output dimension (or the tokenizer's length for raw text)
    real_vocab: int  # ids at or beyond this are padding rows, ignored by the loss
    temperature: float
    mode: str  # topk | sample | text


class ArrayRows:
    """In-memory sequences with the ``gather`` interface of ``storage.stream.ShardRows``."""

    def __init__(self, split: PackedSplit):
        self.arrays = {"input_ids": split.input_ids, "loss_mask": split.loss_mask}

    def gather(self, samples: np.ndarray) -> dict[str, np.ndarray]:
        return {name: array[samples] for name, array in self.arrays.items()}


def cache_source(cache_dir: str, eval_dir: str | None, batch_size: int, seed: int, shuffle_buffer: int,
                 verify: bool, num_workers: int) -> BatchSource:
    from transformers import AutoTokenizer

    manifest = read_manifest(cache_dir)
    data = manifest.data
    tokenizer = AutoTokenizer.from_pretrained(str(Path(cache_dir) / data["tokenizer_dir"]))

    def stream(start: StreamState) -> Iterator[Batch]:
        dataset = SoftTargetStream(cache_dir, batch_size, seed=seed, shuffle_buffer=shuffle_buffer, start=start,
                                   verify=verify)
        return iter(DataLoader(dataset, batch_size=None, num_workers=num_workers))

    probe = SoftTargetStream(cache_dir, batch_size, seed=seed, shuffle_buffer=shuffle_buffer, verify=False)
    held_out = eval_dir or cache_dir
    has_eval = bool(read_manifest(held_out).shards_for("eval"))
    if not has_eval:
        print(f"[distillery train] warning: {held_out} has no eval shards; evaluation is skipped", file=sys.stderr)
    return BatchSource(
        stream=stream,
        eval_batches=(lambda: sequential_batches(held_out, "eval", batch_size, verify)) if has_eval else None,
        batches_per_epoch=probe.batches_per_epoch,
        tokenizer=tokenizer,
        vocab_size=data["vocab_size"],
        real_vocab=data["tokenizer"]["length"],
        temperature=data["temperature"],
        mode=data["mode"],
    )


def text_source(splits: dict[str, PackedSplit], tokenizer, batch_size: int, seed: int) -> BatchSource:
    train = splits["train"]
    rank_count = len(train.input_ids)

    def stream(start: StreamState) -> Iterator[Batch]:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        batches = iterate_batches(ArrayRows(train), [rank_count], batch_size, seed, rank_count, rank, world, start)
        return (to_tensors(b) for b in batches)

    def eval_batches() -> Iterator[Batch]:
        held = splits["eval"]
        for lo in range(0, len(held.input_ids), batch_size):
            yield to_tensors({"input_ids": held.input_ids[lo : lo + batch_size],
                              "loss_mask": held.loss_mask[lo : lo + batch_size]})

    world = int(os.environ.get("WORLD_SIZE", 1))
    return BatchSource(stream=stream, eval_batches=eval_batches if "eval" in splits else None,
                       batches_per_epoch=rank_count // world // batch_size, tokenizer=tokenizer,
                       vocab_size=len(tokenizer), real_vocab=len(tokenizer), temperature=1.0, mode="text")
