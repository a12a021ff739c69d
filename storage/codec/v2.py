"""Format 2 on disk (format 1 is read the same way), written only when ``cache.format_version=2`` asks for it.

Five columns, whatever the mode: ``input_ids`` (T), ``topk_ids`` (T, W), ``topk_logprobs`` (T, W) float16,
``tail_logprob`` (T) float32 and ``loss_mask`` (T) uint8. Token ids are int32, narrowed to uint16 *per shard
and field* when every id is below 65535, with the padding id -1 stored as 65535 (format 1: always int32).
Slots hold the head by descending log-prob, then the sample by descending count (ties by ascending id);
sampled slots store float16 log(count / N), plus the tail mass in hybrid mode, whose ``tail_logprob`` is -inf.
"""
from __future__ import annotations

import numpy as np

from storage.codec.logprobs import count_logprobs
from storage.codec.v3 import ascending

NARROW_PAD = 65535
ID_FIELDS = ("input_ids", "topk_ids")


def _narrowed(array: np.ndarray) -> np.ndarray:
    if array.size == 0 or int(array.max()) < NARROW_PAD:
        return array.astype(np.uint16)  # -1 wraps to NARROW_PAD
    return array


def _widened(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint16:
        wide = array.astype(np.int32)
        wide[array == NARROW_PAD] = -1
        return wide
    return array.astype(np.int32, copy=False)


def encode(layout, targets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Targets (``storage.codec.targets``) -> format-2 columns."""
    n, seq_len = targets["input_ids"].shape
    ids, logprobs = [], []
    tail = np.full((n, seq_len), -np.inf, dtype=np.float32)
    if layout.head_width:
        ids.append(targets["head_ids"])
        logprobs.append(targets["head_logprobs"].astype(np.float16))
        tail = targets["tail_logprob"]
    if layout.sample_width:
        sample_ids, counts = ascending(targets["sample_ids"], targets["sample_counts"])
        order = np.argsort(-counts, axis=-1, kind="stable")
        sample_ids, counts = (np.take_along_axis(a, order, axis=-1) for a in (sample_ids, counts))
        ids.append(sample_ids)
        logprobs.append(count_logprobs(counts, layout.samples, tail if layout.head_width else None))
        tail = np.full((n, seq_len), -np.inf, dtype=np.float32)
    return {"input_ids": _narrowed(targets["input_ids"]), "topk_ids": _narrowed(np.concatenate(ids, axis=-1)),
            "topk_logprobs": np.concatenate(logprobs, axis=-1), "tail_logprob": tail,
            "loss_mask": targets["loss_mask"]}


def decode(layout, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Format-1 or -2 columns -> reader arrays, each section re-sorted by ascending id (``storage.codec.targets``)."""
    ids, logprobs = _widened(stored["topk_ids"]), stored["topk_logprobs"].astype(np.float32)
    head = layout.head_width
    sections = [ascending(ids[..., :head], logprobs[..., :head]), ascending(ids[..., head:], logprobs[..., head:])]
    return {"input_ids": _widened(stored["input_ids"]),
            "topk_ids": np.concatenate([s[0] for s in sections], axis=-1),
            "topk_logprobs": np.concatenate([s[1] for s in sections], axis=-1),
            "tail_logprob": stored["tail_logprob"].astype(np.float32), "loss_mask": stored["loss_mask"]}
