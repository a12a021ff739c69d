"""Tokenize documents and pack them into fixed-length sequences with a loss mask.

Documents are joined with EOS into one token stream and cut into blocks of
``seq_len`` tokens. The final partial block is kept and padded with the
tokenizer's pad token (EOS when there is none).

``loss_mask[j] = 1`` when the token after ``input_ids[j]`` is a training
target: a real token for plain text, a response token for instruction and
chat data (see ``pipeline.data.encode``). Padding, and the row before it, get 0.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from pipeline.data.config import DataConfig
from pipeline.data.encode import make_encoder, required_columns
from pipeline.data.load import load_documents
from pipeline.errors import DataError


@dataclass
class PackedSplit:
    """Packed sequences of one split.

    input_ids: (n, T) int32. loss_mask: (n, T) uint8, 0 at padding.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    documents: int

    @property
    def tokens(self) -> int:
        return int(self.input_ids.size)


def _token_stream(dataset, tokenizer, cfg: DataConfig, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize every document and join them with EOS: int32 ids and uint8 target flags, one per token."""
    encoded = dataset.map(
        make_encoder(cfg, tokenizer), batched=True, remove_columns=dataset.column_names,
        num_proc=cfg.num_proc if cfg.num_proc > 1 else None, desc="tokenizing",
    )
    ids_column = encoded.data.column("ids").combine_chunks()
    targets_column = encoded.data.column("targets").combine_chunks()
    ids = ids_column.flatten().to_numpy(zero_copy_only=False).astype(np.int32)
    targets = targets_column.flatten().to_numpy(zero_copy_only=False).astype(np.uint8)
    ends = np.cumsum(np.diff(ids_column.offsets.to_numpy()))
    starts = np.concatenate([[0], ends[:-1]])
    eos_target = np.maximum.reduceat(targets, starts) if len(targets) else np.zeros(len(ends), np.uint8)
    eos_target[starts == ends] = 0  # reduceat reads the next document for empty ones
    return np.insert(ids, ends, np.int32(eos_id)), np.insert(targets, ends, eos_target.astype(np.uint8))


def pack(stream: np.ndarray, targets: np.ndarray, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut a token stream into (n, seq_len) blocks, padding the last one.

    Returns ids (n, T) int32 and loss_mask (n, T) uint8, where row j's mask is
    the target flag of the token after it (0 after the end of the stream).
    """
    n = -(-len(stream) // seq_len)
    ids = np.full(n * seq_len, pad_id, dtype=np.int32)
    ids[: len(stream)] = stream
    mask = np.zeros(n * seq_len, dtype=np.uint8)
    mask[: len(stream) - 1] = targets[1:]
    return ids.reshape(n, seq_len), mask.reshape(n, seq_len)


def _holdout_indices(n_docs: int, fraction: float, seed: int) -> np.ndarray:
    n_eval = max(1, round(n_docs * fraction))
    if n_eval >= n_docs:
        raise DataError(
            f"data.holdout_fraction {fraction} of {n_docs} documents leaves nothing to train on; lower it"
        )
    return np.sort(np.random.default_rng(seed).permutation(n_docs)[:n_eval])


def _pack_split(dataset, tokenizer, cfg: DataConfig, eos_id: int, pad_id: int, name: str) -> PackedSplit:
    stream, targets = _token_stream(dataset, tokenizer, cfg, eos_id)
    if len(stream) == len(dataset):  # only the EOS separators: every document was empty
        raise DataError(f"the {name} split of {cfg.path!r} has no tokens; its documents are empty")
    ids, mask = pack(stream, targets, cfg.seq_len, pad_id)
    if not mask.any():
        raise DataError(f"the {name} split of {cfg.path!r} has no target tokens (no responses); check data.format")
    return PackedSplit(ids, mask, len(dataset))


def prepare_splits(cfg: DataConfig, tokenizer) -> dict[str, PackedSplit]:
    """Load, split, tokenize and pack the data; returns ``{"train": ..., "eval": ...}`` (eval optional)."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError("the tokenizer has no EOS token, so documents cannot be joined; set tokenizer.eos_token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    documents = load_documents(cfg.path, cfg.split, required_columns(cfg))
    if len(documents) == 0:
        raise DataError(f"data.path {cfg.path!r} split {cfg.split!r} is empty")
    sources = {"train": documents}
    if cfg.eval_path:
        sources["eval"] = load_documents(cfg.eval_path, cfg.eval_split or cfg.split, required_columns(cfg))
    elif cfg.holdout_fraction > 0:
        held = _holdout_indices(len(documents), cfg.holdout_fraction, cfg.seed)
        keep = np.setdiff1d(np.arange(len(documents)), held)
        sources = {"train": documents.select(keep), "eval": documents.select(held)}
    splits = {name: _pack_split(ds, tokenizer, cfg, eos_id, pad_id, name) for name, ds in sources.items()}
    if cfg.max_tokens is not None:
        train = splits["train"]
        n = max(1, cfg.max_tokens // cfg.seq_len)
        splits["train"] = PackedSplit(train.input_ids[:n], train.loss_mask[:n], train.documents)
    return splits


def data_identity(cfg: DataConfig, splits: dict[str, PackedSplit]) -> dict:
    """Description and content hash of the packed data, for the manifest and fingerprint."""
    digest = hashlib.sha256()
    for name in sorted(splits):
        digest.update(name.encode())
        digest.update(splits[name].input_ids.tobytes())
        digest.update(splits[name].loss_mask.tobytes())
    return {
        "path": cfg.path,
        "split": cfg.split,
        "format": cfg.format,
        "columns": required_columns(cfg),
        "eval_path": cfg.eval_path,
        "holdout_fraction": cfg.holdout_fraction,
        "seed": cfg.seed,
        "max_tokens": cfg.max_tokens,
        "documents": {name: s.documents for name, s in splits.items()},
        "sha256": digest.hexdigest(),
    }
