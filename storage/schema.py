"""The per-sequence fields of a shard, shared by every backend.

Row ``j`` of each per-position field describes the teacher's distribution for
the token that follows ``input_ids[j]``.

``FIELDS`` gives the dtypes that writers take and readers return. On disk the
token-id fields are narrowed to uint16 when every id of the shard's field is
below 65535 (any vocabulary up to 65,535 entries), with the padding id -1
stored as 65535; this made a compressed sample-mode shard about an eighth
smaller in the benchmark. Each shard records its own on-disk dtype, so readers widen by it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from storage.errors import ShardSchemaError


@dataclass(frozen=True)
class Field:
    name: str
    dtype: np.dtype
    per_slot: bool  # True: shape (n, T, k); False: shape (n, T)


FIELDS = (
    Field("input_ids", np.dtype("int32"), False),
    Field("topk_ids", np.dtype("int32"), True),
    Field("topk_logprobs", np.dtype("float16"), True),
    Field("tail_logprob", np.dtype("float32"), False),
    Field("loss_mask", np.dtype("uint8"), False),
)
FIELD_NAMES = tuple(f.name for f in FIELDS)
ID_FIELDS = ("input_ids", "topk_ids")
NARROW_PAD = 65535  # uint16 on disk for the padding id -1


def to_disk(name: str, array: np.ndarray) -> np.ndarray:
    """The array as stored: token ids narrowed to uint16 when they all fit below NARROW_PAD."""
    if name in ID_FIELDS and (array.size == 0 or int(array.max()) < NARROW_PAD):
        return array.astype(np.uint16)  # -1 wraps to NARROW_PAD
    return array


def from_disk(name: str, array: np.ndarray) -> np.ndarray:
    """Undo ``to_disk``: the field's dtype from ``FIELDS``, with NARROW_PAD back to -1."""
    dtype = next(f.dtype for f in FIELDS if f.name == name)
    if array.dtype == np.uint16 and name in ID_FIELDS:
        wide = array.astype(dtype)
        wide[array == NARROW_PAD] = -1
        return wide
    return array.astype(dtype, copy=False)


def check_arrays(arrays: dict[str, np.ndarray]) -> tuple[int, int, int]:
    """Validate a shard's arrays and return ``(sequences, seq_len, width)``.

    Every problem is reported in one ``ShardSchemaError``.
    """
    problems = []
    missing = [n for n in FIELD_NAMES if n not in arrays]
    extra = [n for n in arrays if n not in FIELD_NAMES]
    if missing:
        problems.append(f"missing fields {missing}")
    if extra:
        problems.append(f"unknown fields {extra}")
    if problems:
        raise ShardSchemaError("; ".join(problems))
    n, seq_len = arrays["input_ids"].shape[:2]
    width = arrays["topk_ids"].shape[-1]
    for field in FIELDS:
        array = arrays[field.name]
        want = (n, seq_len, width) if field.per_slot else (n, seq_len)
        if array.shape != want:
            problems.append(f"{field.name} has shape {array.shape}, expected {want}")
        if array.dtype != field.dtype:
            problems.append(f"{field.name} has dtype {array.dtype}, expected {field.dtype}")
    if n == 0:
        problems.append("a shard needs at least one sequence")
    if problems:
        raise ShardSchemaError("; ".join(problems))
    return n, seq_len, width
