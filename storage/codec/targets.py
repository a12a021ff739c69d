"""The arrays of one shard as stage 1 hands them to the writer (targets), and as readers return them.

Targets, for n sequences of T tokens (``storage.codec.layout`` turns them into stored columns):

* ``input_ids`` (n, T) int32 and ``loss_mask`` (n, T) uint8, always;
* ``head_ids`` (n, T, K) int32, ``head_logprobs`` (n, T, K) float32 and ``tail_logprob`` (n, T) float32 (the
  log of the mass outside the head), in ``topk`` and ``hybrid`` mode; any order of the K distinct ids;
* ``sample_ids`` (n, T, S) int32 and ``sample_counts`` (n, T, S) int32, in ``sample`` and ``hybrid`` mode: the
  distinct drawn ids and how often each was drawn; unused slots hold id -1 and count 0;
* ``token_role`` (n, T) uint8, in a cache with text alignment (``Manifest.text_alignment``): ``ROLE_TEXT`` (0)
  for a token of the text, ``ROLE_DOCUMENT_END`` (1) for the EOS that packing put after a document, and
  ``ROLE_PADDING`` (2) for the padding of the final sequence. With the teacher's tokenizer, which spells every
  text token as bytes, it gives back the exact text of each sequence; readers pass it through.

Readers return ``READER_FIELDS``: row ``j`` of each per-position field describes the teacher's distribution
for the token that follows ``input_ids[j]``. The W = K + S slots hold the head, then the sample, each in
ascending id order with unused slots (id -1, log-prob -inf) last.
"""
from __future__ import annotations

import numpy as np

from storage.errors import ShardSchemaError

COMMON = {"input_ids": np.dtype("int32"), "loss_mask": np.dtype("uint8")}
HEAD = {"head_ids": np.dtype("int32"), "head_logprobs": np.dtype("float32"), "tail_logprob": np.dtype("float32")}
SAMPLE = {"sample_ids": np.dtype("int32"), "sample_counts": np.dtype("int32")}
ROLES = {"token_role": np.dtype("uint8")}
ROLE_TEXT, ROLE_DOCUMENT_END, ROLE_PADDING = 0, 1, 2
PER_SLOT = ("head_ids", "head_logprobs", "sample_ids", "sample_counts")
READER_FIELDS = {"input_ids": np.dtype("int32"), "topk_ids": np.dtype("int32"), "topk_logprobs": np.dtype("float32"),
                 "tail_logprob": np.dtype("float32"), "loss_mask": np.dtype("uint8")}


def check_targets(arrays: dict[str, np.ndarray], head_width: int, sample_width: int,
                  roles: bool = False) -> tuple[int, int]:
    """Validate one shard's targets for a layout with ``head_width`` and ``sample_width`` slots (and token roles);
    return ``(sequences, seq_len)``. Every problem is reported in one ``ShardSchemaError``."""
    want = {**COMMON, **(HEAD if head_width else {}), **(SAMPLE if sample_width else {}), **(ROLES if roles else {})}
    missing = [name for name in want if name not in arrays]
    extra = [name for name in arrays if name not in want]
    problems = [f"missing fields {missing}"] * bool(missing) + [f"unknown fields {extra}"] * bool(extra)
    if problems:
        raise ShardSchemaError("; ".join(problems))
    n, seq_len = arrays["input_ids"].shape[:2]
    widths = {"head_ids": head_width, "head_logprobs": head_width, "sample_ids": sample_width,
              "sample_counts": sample_width}
    for name, dtype in want.items():
        shape = (n, seq_len, widths[name]) if name in PER_SLOT else (n, seq_len)
        if arrays[name].shape != shape:
            problems.append(f"{name} has shape {arrays[name].shape}, expected {shape}")
        if arrays[name].dtype != dtype:
            problems.append(f"{name} has dtype {arrays[name].dtype}, expected {dtype}")
    if n == 0:
        problems.append("a shard needs at least one sequence")
    if problems:
        raise ShardSchemaError("; ".join(problems))
    return n, seq_len
