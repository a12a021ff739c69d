"""Where training batches come from: a finished cache, or packed raw text for ``pretrain``.

Both give the trainer the same things: a resumable training stream, a
held-out pass, the tokenizer, and the facts the loss needs. ``mode`` says
which targets the batches carry: ``topk``, ``sample`` or ``hybrid`` for a
cache, ``text`` for raw text.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.data.pack import PackedSplit
from pipeline.dist import world
from pipeline.errors import ConfigError, DataError
from pipeline.log import get_logger
from pipeline.train.align import TextAlignment, next_token_bytes
from pipeline.train.config import SourceConfig
from storage import (
    Cache,
    CacheError,
    ChecksumError,
    Manifest,
    ShardRecord,
    SoftTargetStream,
    StreamOrder,
    StreamState,
    iterate_batches,
    open_cache,
    sequential_batches,
    to_tensors,
)

Batch = dict[str, torch.Tensor]
log = get_logger("train")


@dataclass
class BatchSource:
    """A training stream factory plus everything the loop needs to know about the data."""

    stream: Callable[[StreamState], Iterator[Batch]]
    eval_batches: Callable[[], Iterator[Batch]] | None
    """Every held-out batch in a fixed order; the trainer deals them out to the ranks."""
    tokenizer: object
    vocab_size: int  # the cache teacher's output dimension (or the tokenizer's length for raw text)
    real_vocab: int  # ids at or beyond this are padding rows, ignored by the loss
    temperature: float
    mode: str  # topk | sample | hybrid | text
    alignment: TextAlignment | None = None  # a student with another tokenizer than the cache's
    teacher_vocab: int | None = None  # the cache tokenizer's length, with ``alignment``


class ArrayRows:
    """In-memory sequences with the ``gather`` interface of ``storage.read.stream.ShardRows``."""

    def __init__(self, split: PackedSplit):
        self.arrays = {"input_ids": split.input_ids, "loss_mask": split.loss_mask}

    def gather(self, samples: np.ndarray) -> dict[str, np.ndarray]:
        return {name: array[samples] for name, array in self.arrays.items()}


def _check_shards(cache: Cache, records: list[ShardRecord]) -> None:
    """Hash this rank's share of ``records`` before the first step, so that a damaged cache never trains, not
    even for the steps before the reader reaches the damaged shard. A rank that fails exits, and torchrun then
    stops the others; the reader still checks each shard when it opens it, for damage during a long run."""
    here = world()
    problems = cache.verify(records[here.rank :: here.size])
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ChecksumError(f"cache {cache.location} is damaged: {problems[0]}{more}; nothing was trained: run "
                            f"`distillery verify {cache.location}` and rebuild the cache")


def _open(key: str, source: SourceConfig, location: str) -> Cache:
    """The cache that the setting ``key`` names, opened; its errors name the key."""
    try:
        return open_cache(location, source.local_dir, source.local_bytes)
    except CacheError as exc:
        raise type(exc)(f"{key}: {exc}") from None


def _check_draws(source: SourceConfig, manifest: Manifest) -> None:
    """``cache.draws_per_epoch`` needs stored draw counts (a format-3 sample or hybrid cache) and fewer than N."""
    draws, where = source.draws_per_epoch, manifest.location
    if draws is None:
        return
    if manifest.mode not in ("sample", "hybrid"):
        raise ConfigError(f"cache.draws_per_epoch={draws} needs a sample or hybrid cache, but {where} is a "
                          f"{manifest.mode} cache: drop the key or cache with cache.mode=sample")
    if manifest.format_version < 3:
        raise ConfigError(f"cache.draws_per_epoch={draws} needs the draw counts of a format-3 cache, but {where} "
                          f"is format {manifest.format_version}: cache again with cache.format_version=3")
    if draws >= manifest.samples:
        raise ConfigError(f"cache.draws_per_epoch={draws} must be below the {manifest.samples} draws per position "
                          f"stored in {where} (cache.samples)")


def _check_alignment(manifest: Manifest, student_tokenizer: str) -> None:
    if manifest.text_alignment is None:
        raise ConfigError(f"student.tokenizer {student_tokenizer!r} differs from the tokenizer of {manifest.location}, "
                          "a cache made without text alignment (before it existed, or with cache.text_alignment="
                          "false); rebuild the cache with this version of `distillery cache` to train this student")


def cache_source(source: SourceConfig, order: StreamOrder, num_workers: int, student_tokenizer=None,
                 student_positions: int | None = None) -> BatchSource:
    """Batches of a finished cache's train split; held-out batches from ``cache.eval_dir`` (default: the same
    cache). A cache at a URL is read through local copies of its shards (``cache.local_dir``). With a
    ``student_tokenizer`` other than the cache's, batches are the student's (``pipeline.train.align``)."""
    from transformers import AutoTokenizer

    from pipeline.models.hf import tokenizer_sha256

    cache = _open("cache.dir", source, source.dir)
    manifest = cache.manifest
    _check_draws(source, manifest)
    tokenizer = AutoTokenizer.from_pretrained(str(cache.store.folder(manifest.tokenizer_dir)))
    convert = _byte_counter(tokenizer) if manifest.text_alignment else (lambda batch: batch)
    alignment = None
    if student_tokenizer is not None and tokenizer_sha256(student_tokenizer) != tokenizer_sha256(tokenizer):
        _check_alignment(manifest, student_tokenizer.name_or_path)
        alignment = TextAlignment(tokenizer, student_tokenizer, student_positions)
        convert = alignment.student_batch

    # With ``cache.verify``, every shard is hashed once below, before the first step; the readers do not hash
    # again (they would at every resume, and eval would at every evaluation).
    def stream(start: StreamState) -> Iterator[Batch]:
        dataset = SoftTargetStream(cache, order, start=start, verify=False, draws_per_epoch=source.draws_per_epoch)
        return map(convert, DataLoader(dataset, batch_size=None, num_workers=num_workers))

    SoftTargetStream(cache, order, verify=False)  # fails early when the global batch exceeds the split
    eval_dir = source.eval_dir
    held_out = _open("cache.eval_dir", source, eval_dir) if eval_dir else cache
    if source.verify:
        _check_shards(cache, manifest.shards_for("train") if eval_dir else manifest.shards)
        if eval_dir:
            _check_shards(held_out, held_out.manifest.shards_for("eval"))
    if alignment and eval_dir:
        _check_alignment(held_out.manifest, student_tokenizer.name_or_path)
    has_eval = bool(held_out.manifest.shards_for("eval"))
    if not has_eval:
        log.warning(f"{held_out.location} has no eval shards; evaluation is skipped")
    return BatchSource(
        stream=stream,
        eval_batches=(lambda: map(convert, sequential_batches(held_out, "eval", order.batch_size, False)))
        if has_eval else None,
        tokenizer=student_tokenizer if alignment else tokenizer,
        vocab_size=len(student_tokenizer) if alignment else manifest.vocab_size,
        real_vocab=len(student_tokenizer) if alignment else manifest.tokenizer_length,
        temperature=manifest.temperature,
        mode=manifest.mode,
        alignment=alignment,
        teacher_vocab=manifest.tokenizer_length,
    )


def _byte_counter(tokenizer):
    """Adds ``target_bytes`` to a same-tokenizer batch of a cache with text alignment, for bits per byte."""
    from pipeline.models.token_bytes import byte_lengths, tokenizer_family, vocab_bytes

    if tokenizer_family(tokenizer) is None:
        return lambda batch: batch
    lengths = torch.from_numpy(byte_lengths(vocab_bytes(tokenizer)))

    def convert(batch: Batch) -> Batch:
        if "token_role" not in batch:  # held-out batches of a ``cache.eval_dir`` without text alignment
            return batch
        return {**batch, "target_bytes": next_token_bytes(batch["input_ids"], batch["token_role"], lengths)}

    return convert


def text_source(splits: dict[str, PackedSplit], tokenizer, order: StreamOrder) -> BatchSource:
    """Batches of packed raw text; the whole train split is one shuffle block."""
    train = splits["train"]
    sequences = len(train.input_ids)
    if order.steps_per_epoch(sequences) == 0:
        raise DataError(f"the global batch of {order.global_batch} sequences exceeds the {sequences} packed training "
                        "sequences; lower train.batch_size or train.grad_accum, or add data")
    order = replace(order, shuffle_buffer=sequences)
    batch_size = order.batch_size

    def stream(start: StreamState) -> Iterator[Batch]:
        return (to_tensors(b) for b in iterate_batches(ArrayRows(train), [sequences], order, start))

    def eval_batches() -> Iterator[Batch]:
        held = splits["eval"]
        for lo in range(0, len(held.input_ids), batch_size):
            yield to_tensors({"input_ids": held.input_ids[lo : lo + batch_size],
                              "loss_mask": held.loss_mask[lo : lo + batch_size]})

    return BatchSource(stream=stream, eval_batches=eval_batches if "eval" in splits else None, tokenizer=tokenizer,
                       vocab_size=len(tokenizer), real_vocab=len(tokenizer), temperature=1.0, mode="text")
