"""``distillery export``: a finished cache, or a slice of one split, as a Hugging Face ``datasets`` folder
(what ``Dataset.save_to_disk`` writes, so ``datasets.load_from_disk`` loads it) or as zstd Parquet files.

One row per sequence of T tokens; W is the cache's slot width (``manifest.width``). The columns follow the
pre-tokenised KD dataset Axolotl's KD plugin trains on (``input_ids``, ``attention_mask``, ``labels`` plus
``target_token_ids``, ``target_logprobs``, ``target_mask``; axolotl ``src/axolotl/integrations/kd``):

* ``input_ids`` list<int32> (T), ``attention_mask`` list<int8> (T): all 1 (rows are packed and causal);
* ``labels`` list<int32> (T), the Hugging Face convention (the model shifts): ``labels[0] = -100`` and
  ``labels[j + 1] = input_ids[j + 1]`` where ``loss_mask[j]``, else -100;
* ``loss_mask`` list<uint8> (T), as cached: row j's next token is a target (it also covers the last row,
  whose next token opens the following sequence and so has no label);
* ``target_token_ids`` list<list<int32>> (T x W), ``target_logprobs`` list<list<float32>> (T x W) and
  ``target_mask`` list<list<int8>> (T x W): row j is the teacher's distribution over the token after
  ``input_ids[j]`` (Distillery's row j unchanged; Axolotl pairs target row j with the hidden state at j).
  Slots in the reader's order. An unused slot holds id ``PAD_ID`` (0, a valid index for ``torch.gather``) and
  log-prob ``LOGPROB_FLOOR`` (-1e9), as Axolotl's KD collator pads; a log-prob of -inf is written as the floor
  too, so no column holds inf or NaN. ``target_mask`` is 1 where the slot holds an id with a finite log-prob
  at a position with ``loss_mask`` 1, else 0;
* ``tail_logprob`` list<float32> (T): the log of the mass outside the head, the floor where there is none.

Log-probs are as cached, at the cache's temperature, not renormalised over the slots. Every file's schema
carries the provenance (cache, fingerprint, split, rows, temperature) as JSON under ``distillery``.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from storage.describe import read_cache
from storage.errors import ExportError
from storage.io.atomic import atomic_write, ensure_writable
from storage.manifest import Manifest
from storage.read.reader import ShardLoader
from storage.remote.fs import is_url
from storage.remote.store import Cache, LocalShards

EXPORT_TARGETS = ("hf", "parquet")
PAD_ID = 0
LOGPROB_FLOOR = -1e9
IGNORE_INDEX = -100
BATCH_BYTES = 64 << 20
"""Rows are converted and written in record batches of about this many bytes."""
COLUMNS = {"input_ids": pa.int32(), "attention_mask": pa.int8(), "labels": pa.int32(), "loss_mask": pa.uint8(),
           "target_token_ids": pa.int32(), "target_logprobs": pa.float32(), "target_mask": pa.int8(),
           "tail_logprob": pa.float32()}
PER_SLOT = ("target_token_ids", "target_logprobs", "target_mask")


@dataclass(frozen=True)
class Selection:
    """The rows of one split to export: ``(shard index, first row, end row)`` within each shard read."""

    split: str
    start: int
    rows: int
    parts: tuple[tuple[int, int, int], ...]


def select(manifest: Manifest, split: str, start: int = 0, max_sequences: int | None = None) -> Selection:
    """Sequences ``start`` .. ``start + max_sequences`` of ``split`` in manifest order, or an ``ExportError``."""
    records = manifest.shards_for(split)
    if not records:
        names = ", ".join(sorted({r.split for r in manifest.shards})) or "none"
        raise ExportError(f"cache {manifest.location} has no split {split!r} (its splits: {names}); "
                          "choose one with --split")
    total = sum(r.sequences for r in records)
    if start < 0 or start >= total:
        raise ExportError(f"--start {start} is outside the {total} {split!r} sequences of {manifest.location}; "
                          f"give a --start from 0 to {total - 1}")
    if max_sequences is not None and max_sequences < 1:
        raise ExportError(f"--max-sequences {max_sequences} exports nothing; give 1 or more, or leave it out")
    end = total if max_sequences is None else min(total, start + max_sequences)
    parts, offset = [], 0
    for index, record in enumerate(records):
        lo, hi = max(start, offset), min(end, offset + record.sequences)
        if lo < hi:
            parts.append((index, lo - offset, hi - offset))
        offset += record.sequences
    return Selection(split, start, end - start, tuple(parts))


def check_out(cache: Cache, out: Path, overwrite: bool) -> None:
    """Refuse an output that exists and is not an empty directory (unless ``overwrite``), or that would
    replace or sit inside the cache itself."""
    if isinstance(cache.store, LocalShards):
        folder, target = cache.store.directory.resolve(), out.resolve()
        if folder == target or folder.is_relative_to(target) or target.is_relative_to(folder):
            raise ExportError(f"--out {out} is the cache {cache.location}, inside it or a folder around it; "
                              "choose a directory outside the cache")
    if out.is_dir() and not any(out.iterdir()) or not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        what = "a directory that is not empty" if out.is_dir() else "a file"
        raise ExportError(f"--out {out} is {what}; choose a new or empty directory, or pass --overwrite to "
                          "replace it")


def _lists(values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """(n, T) or (n, T, W) values -> list<...> or list<list<...>>, one entry per row, without a Python loop."""
    array = pa.array(np.ascontiguousarray(values).reshape(-1), type=value_type)
    for size in reversed(values.shape[1:]):
        offsets = pa.array(np.arange(len(array) // size + 1, dtype=np.int32) * size, type=pa.int32())
        array = pa.ListArray.from_arrays(offsets, array)
    return array


def to_columns(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Reader arrays (``storage.codec.targets.READER_FIELDS``) of n sequences -> the exported columns as arrays."""
    ids, keep = arrays["input_ids"].astype(np.int32), arrays["loss_mask"].astype(bool)
    labels = np.full_like(ids, IGNORE_INDEX)
    labels[:, 1:] = np.where(keep[:, :-1], ids[:, 1:], IGNORE_INDEX)
    slot_ids, logprobs = arrays["topk_ids"], arrays["topk_logprobs"].astype(np.float32)
    used = slot_ids >= 0
    real = used & np.isfinite(logprobs) & keep[..., None]
    floor = np.float32(LOGPROB_FLOOR)
    tail = arrays["tail_logprob"].astype(np.float32)
    return {"input_ids": ids, "attention_mask": np.ones(ids.shape, np.int8), "labels": labels,
            "loss_mask": arrays["loss_mask"].astype(np.uint8),
            "target_token_ids": np.where(used, slot_ids, PAD_ID).astype(np.int32),
            "target_logprobs": np.where(used & (logprobs > floor), logprobs, floor),  # -inf and NaN -> floor
            "target_mask": real.astype(np.int8), "tail_logprob": np.where(tail > floor, tail, floor)}


def to_batch(arrays: dict[str, np.ndarray], schema: pa.Schema) -> pa.RecordBatch:
    columns = to_columns(arrays)
    return pa.RecordBatch.from_arrays([_lists(columns[name], COLUMNS[name]) for name in COLUMNS], schema=schema)


def _provenance(manifest: Manifest, selection: Selection) -> dict:
    return {"cache": manifest.location, "fingerprint": manifest.fingerprint, "teacher": manifest.teacher.get("name"),
            "mode": manifest.mode, "width": manifest.width, "vocab_size": manifest.vocab_size,
            "seq_len": manifest.seq_len, "temperature": manifest.temperature, "split": selection.split,
            "start": selection.start, "rows": selection.rows, "pad_id": PAD_ID, "logprob_floor": LOGPROB_FLOOR,
            "alignment": "target row j is the teacher's distribution over the token after input_ids[j]"}


def _schema(provenance: dict):
    """The Arrow schema, with the ``datasets`` features in its metadata (as ``save_to_disk`` writes them)."""
    import datasets

    plain = pa.schema([(name, pa.list_(pa.list_(kind) if name in PER_SLOT else kind))
                       for name, kind in COLUMNS.items()])
    features = datasets.Features.from_arrow_schema(plain)
    schema = features.arrow_schema
    return features, schema.with_metadata({**schema.metadata, b"distillery": json.dumps(provenance).encode()})


class _Files:
    """Writes one file per shard read, ``data-00000-of-0000N.<ext>``, into ``folder``."""

    def __init__(self, folder: Path, target: str, schema: pa.Schema, count: int):
        self.folder, self.target, self.schema, self.count = folder, target, schema, count
        self.names: list[str] = []

    def write(self, batches) -> None:
        name = f"data-{len(self.names):05d}-of-{self.count:05d}.{'arrow' if self.target == 'hf' else 'parquet'}"
        path = self.folder / name
        if self.target == "hf":
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, self.schema) as writer:
                for batch in batches:
                    writer.write_batch(batch)
        else:
            with pq.ParquetWriter(path, self.schema, compression="zstd") as writer:
                for batch in batches:
                    writer.write_batch(batch)
        self.names.append(name)


def _write_hf_metadata(folder: Path, features, provenance: dict, names: list[str]) -> None:
    """``dataset_info.json`` and ``state.json``, with the keys ``Dataset.save_to_disk`` writes."""
    import datasets

    datasets.DatasetInfo(description=json.dumps(provenance), features=features).write_to_directory(str(folder))
    state = {"_data_files": [{"filename": name} for name in names],
             "_fingerprint": f"{provenance['fingerprint']}{provenance['split']}{provenance['start']}"[:16],
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": provenance["split"]}
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")


def _batches(arrays: dict[str, np.ndarray], lo: int, hi: int, schema: pa.Schema, bar: tqdm):
    seq_len, width = arrays["topk_ids"].shape[1:]
    step = max(1, BATCH_BYTES // (seq_len * (14 + 9 * width)))
    for first in range(lo, hi, step):
        part = {name: a[first : min(hi, first + step)] for name, a in arrays.items()}
        yield to_batch(part, schema)
        bar.update(len(part["input_ids"]))


def export_cache(location: str | os.PathLike, out: str | os.PathLike, target: str = "hf", split: str = "train",
                 max_sequences: int | None = None, start: int = 0, overwrite: bool = False,
                 progress: bool = True) -> dict:
    """Write sequences ``start`` .. ``start + max_sequences`` of ``split`` of the cache at ``location`` (a
    directory or URL) to the directory ``out`` as ``target`` (``hf`` or ``parquet``), shard by shard, each shard's
    checksum verified. ``out`` appears complete or not at all. Returns rows, files and bytes written."""
    if target not in EXPORT_TARGETS:
        raise ExportError(f"--format {target!r} is not one of {', '.join(EXPORT_TARGETS)}; choose one")
    if is_url(str(out)):
        raise ExportError(f"--out {out} is a URL; export to a local directory, then upload it")
    out = Path(out)
    cache = read_cache(location)
    manifest = cache.manifest
    selection = select(manifest, split, start, max_sequences)
    check_out(cache, out, overwrite)
    ensure_writable(out.absolute().parent, "--out")
    provenance = _provenance(manifest, selection)
    features, schema = _schema(provenance)
    loader = ShardLoader(cache, split, verify=True, upcoming=iter([index for index, _, _ in selection.parts]))
    with atomic_write(out) as tmp, tqdm(total=selection.rows, unit="seq", desc="export", file=sys.stderr,
                                          disable=not progress) as bar:
        tmp.mkdir()
        files = _Files(tmp, target, schema, len(selection.parts))
        for index, lo, hi in selection.parts:
            files.write(_batches(loader(index), lo, hi, schema, bar))
        if target == "hf":
            _write_hf_metadata(tmp, features, provenance, files.names)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return {"cache": manifest.location, "out": str(out), "format": target, "split": split, "start": selection.start,
            "rows": selection.rows, "files": len(files.names), "bytes": size}

