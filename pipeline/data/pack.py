"""Tokenize documents batch by batch and pack them, streaming, into fixed-length sequences with a loss mask.

Documents are joined with EOS into one token stream and cut into blocks of
``seq_len`` tokens. The final partial block is kept and padded with the
tokenizer's pad token (EOS when there is none). The stream arrives one batch
of documents at a time; only the partial block is carried between batches,
so memory does not grow with the data (``pipeline.data.store`` writes the
rows to disk as they are cut).

``loss_mask[j] = 1`` when the token after ``input_ids[j]`` is a training
target: a real token for plain text, a response token for instruction and
chat data (see ``pipeline.data.encode``). Padding, and the row before it, get 0.
``token_role[j]`` says what ``input_ids[j]`` is (``storage.codec.targets``): a token of the text, the EOS that
ends a document, or padding; with it, a row's text can be spelled again (cross-tokenizer students).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.data.config import DataConfig
from pipeline.data.encode import make_encoder, required_columns
from pipeline.data.generations import open_generation
from pipeline.data.sources import routed_batches, split_names
from pipeline.errors import DataError
from storage import ROLE_DOCUMENT_END, ROLE_PADDING


@dataclass
class PackedSplit:
    """Packed sequences of one split.

    input_ids: (n, T) int32. loss_mask: (n, T) uint8, 0 at padding. token_role: (n, T) uint8 (None: unknown).
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    documents: int
    token_role: np.ndarray | None = None

    @property
    def tokens(self) -> int:
        return int(self.input_ids.size)


def batch_stream(encoded: dict, eos_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One batch's documents joined with EOS: int32 ids, uint8 target flags and uint8 token roles, one per token.

    The EOS that ends a document is a target when the document has any target, unless the encoder says which
    are (``eos_targets``: a generation cut at ``max_new_tokens`` did not stop there).
    """
    ids_column = pa.array(encoded["ids"], type=pa.list_(pa.int32()))
    ids = ids_column.flatten().to_numpy(zero_copy_only=False)
    targets = pa.array(encoded["targets"], type=pa.list_(pa.uint8())).flatten().to_numpy(zero_copy_only=False)
    lengths = np.diff(ids_column.offsets.to_numpy())
    ends = np.cumsum(lengths)
    running = np.concatenate([[0], np.cumsum(targets, dtype=np.int64)])
    eos_target = (running[ends] - running[ends - lengths] > 0).astype(np.uint8)
    if "eos_targets" in encoded:
        eos_target &= np.asarray(encoded["eos_targets"], dtype=np.uint8)
    roles = np.insert(np.zeros(len(ids), np.uint8), ends, np.uint8(ROLE_DOCUMENT_END))
    return np.insert(ids, ends, np.int32(eos_id)), np.insert(targets, ends, eos_target), roles


def pack(stream: np.ndarray, targets: np.ndarray, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut a whole token stream into (n, seq_len) blocks, padding the last one.

    Returns ids (n, T) int32 and loss_mask (n, T) uint8, where row j's mask is
    the target flag of the token after it (0 after the end of the stream).
    """
    n = -(-len(stream) // seq_len)
    ids = np.full(n * seq_len, pad_id, dtype=np.int32)
    ids[: len(stream)] = stream
    mask = np.zeros(n * seq_len, dtype=np.uint8)
    mask[: len(stream) - 1] = targets[1:]
    return ids.reshape(n, seq_len), mask.reshape(n, seq_len)


class RowPacker:
    """Cuts a token stream that arrives in pieces into rows for ``sink``, as ``pack`` would cut the whole stream.

    A row is emitted once the token after it has arrived (its last mask bit is
    that token's target flag), so the carry is at most ``seq_len`` tokens. With
    ``limit``, the packer is ``full`` after that many rows and ignores the rest.
    """

    def __init__(self, seq_len: int, pad_id: int, sink, limit: int | None = None):
        self.seq_len, self.pad_id, self.sink, self.limit = seq_len, pad_id, sink, limit
        self.carry_ids = np.empty(0, np.int32)
        self.carry_targets, self.carry_roles = np.empty(0, np.uint8), np.empty(0, np.uint8)
        self.rows = self.documents = self.real_tokens = self.max_id = 0
        self.any_target = False
        self.ids_digest, self.mask_digest = hashlib.sha256(), hashlib.sha256()

    @property
    def full(self) -> bool:
        return self.limit is not None and self.rows >= self.limit

    def add(self, ids: np.ndarray, targets: np.ndarray, roles: np.ndarray, documents: int) -> None:
        if self.full:
            return
        self.documents += documents
        self.real_tokens += len(ids) - documents  # one EOS per document
        ids = np.concatenate([self.carry_ids, ids])
        targets = np.concatenate([self.carry_targets, targets])
        roles = np.concatenate([self.carry_roles, roles])
        count = (len(ids) - 1) // self.seq_len
        if self.limit is not None:
            count = min(count, self.limit - self.rows)
        end = count * self.seq_len
        if count:
            self._emit(ids[:end].reshape(count, -1), targets[1 : end + 1].reshape(count, -1),
                       roles[:end].reshape(count, -1))
        self.carry_ids, self.carry_targets, self.carry_roles = ids[end:], targets[end:], roles[end:]

    def finish(self) -> None:
        """Pad and emit the final partial row."""
        left = len(self.carry_ids)
        if self.full or not left:
            return
        ids = np.full((1, self.seq_len), self.pad_id, dtype=np.int32)
        ids[0, :left] = self.carry_ids
        mask = np.zeros((1, self.seq_len), dtype=np.uint8)
        mask[0, : left - 1] = self.carry_targets[1:]
        roles = np.full((1, self.seq_len), ROLE_PADDING, dtype=np.uint8)
        roles[0, :left] = self.carry_roles
        self._emit(ids, mask, roles)

    def _emit(self, ids: np.ndarray, mask: np.ndarray, roles: np.ndarray) -> None:
        self.sink.write(ids, mask, roles)
        self.ids_digest.update(ids.tobytes())
        self.mask_digest.update(mask.tobytes())
        self.rows += len(ids)
        self.any_target = self.any_target or bool(mask.any())
        self.max_id = max(self.max_id, int(ids.max()))


class MemoryRows:
    """A packer sink that keeps the rows in memory (``pretrain`` and small tests)."""

    def __init__(self):
        self.ids: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.roles: list[np.ndarray] = []

    def write(self, ids: np.ndarray, mask: np.ndarray, roles: np.ndarray) -> None:
        self.ids.append(ids)
        self.masks.append(mask)
        self.roles.append(roles)

    def split(self, seq_len: int, documents: int) -> PackedSplit:
        empty = np.empty((0, seq_len))
        return PackedSplit(np.concatenate([empty.astype(np.int32), *self.ids]),
                           np.concatenate([empty.astype(np.uint8), *self.masks]), documents,
                           np.concatenate([empty.astype(np.uint8), *self.roles]))


def special_ids(tokenizer) -> tuple[int, int]:
    """The EOS that joins documents and the pad id of the final block (EOS when there is no pad token)."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError(f"the tokenizer of {tokenizer.name_or_path!r} has no EOS token, which joins the documents; "
                        "set eos_token in its tokenizer_config.json, or use a tokenizer that has one")
    return eos_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id


def _check_split(cfg: DataConfig, name: str, packer: RowPacker) -> None:
    if not packer.real_tokens:
        raise DataError(f"the {name} split of {cfg.path!r} has no tokens; its documents are empty")
    if not packer.any_target:
        raise DataError(f"the {name} split of {cfg.path!r} has no target tokens (no responses); check data.format")


def _row_limit(tokens: int | None, seq_len: int) -> int | None:
    return None if tokens is None else max(1, tokens // seq_len)


def pack_documents(cfg: DataConfig, tokenizer, sinks: dict) -> dict[str, RowPacker]:
    """Read, split, tokenize and pack the data into ``sinks`` (one per name of ``split_names``), batch by batch.

    ``data.max_tokens`` stops reading training documents once its rows exist; ``data.eval_max_tokens`` drops
    held-out rows beyond its own.
    """
    eos_id, pad_id = special_ids(tokenizer)
    limits = {"train": cfg.max_tokens, "eval": cfg.eval_max_tokens}
    packers = {name: RowPacker(cfg.seq_len, pad_id, sink, _row_limit(limits.get(name), cfg.seq_len))
               for name, sink in sinks.items()}
    for name, encoded in routed_batches(cfg, make_encoder(cfg, tokenizer), lambda: packers["train"].full):
        packers[name].add(*batch_stream(encoded, eos_id), len(encoded["ids"]))
    for name in split_names(cfg):
        packers[name].finish()
        _check_split(cfg, name, packers[name])
    return packers


def content_sha256(packers: dict[str, RowPacker]) -> str:
    """The hash of the packed data: per split (sorted by name), its name and the sha256 of its ids and its mask."""
    digest = hashlib.sha256()
    for name in sorted(packers):
        digest.update(name.encode())
        digest.update(packers[name].ids_digest.digest())
        digest.update(packers[name].mask_digest.digest())
    return digest.hexdigest()


def prepare_splits(cfg: DataConfig, tokenizer) -> dict[str, PackedSplit]:
    """Pack the data in memory; returns ``{"train": ..., "eval": ...}`` (eval optional)."""
    sinks = {name: MemoryRows() for name in split_names(cfg)}
    packers = pack_documents(cfg, tokenizer, sinks)
    return {name: sinks[name].split(cfg.seq_len, packers[name].documents) for name in sinks}


def data_identity(cfg: DataConfig, documents: dict[str, int], sha256: str) -> dict:
    """Description and content hash of the packed data, for the manifest and fingerprint; data from a generation
    folder also names the generation (its fingerprint and sealed manifest)."""
    generation = open_generation(cfg.path)
    identity = {
        "path": cfg.path,
        "split": cfg.split,
        "format": cfg.format,
        "columns": required_columns(cfg),
        "eval_path": cfg.eval_path,
        "holdout_fraction": cfg.holdout_fraction,
        "seed": cfg.seed,
        "max_tokens": cfg.max_tokens,
        "eval_max_tokens": cfg.eval_max_tokens,
        "documents": documents,
        "sha256": sha256,
    }
    return identity if generation is None else {**identity, "generation": generation.identity}
