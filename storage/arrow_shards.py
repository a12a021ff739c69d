"""Arrow IPC shard backend: one file, one row per sequence.

Per-position fields are ``fixed_size_list<T>``; per-slot fields are
``fixed_size_list<fixed_size_list<k>>[T]``, so ``pyarrow.ipc.open_file`` reads
a shard directly with no Distillery code.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from storage.atomic import atomic_write
from storage.schema import FIELDS, check_arrays, from_disk, to_disk

ROWS_PER_BATCH = 64


def _column(array: np.ndarray) -> pa.Array:
    """Nest a C-contiguous (n, T[, k]) array into fixed-size lists, row = sequence."""
    values: pa.Array = pa.array(np.ascontiguousarray(array).reshape(-1))
    for size in reversed(array.shape[1:]):
        values = pa.FixedSizeListArray.from_arrays(values, size)
    return values


def _to_numpy(column: pa.ChunkedArray | pa.Array, shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = column
    while pa.types.is_fixed_size_list(values.type):
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False).reshape(shape)


class ArrowFormat:
    name = "arrow"
    suffix = ".arrow"

    def write(self, path: Path, arrays: dict[str, np.ndarray], level: int) -> None:
        n, _, _ = check_arrays(arrays)
        columns = {f.name: _column(to_disk(f.name, arrays[f.name])) for f in FIELDS}
        table = pa.table(columns)
        options = ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=level))
        with atomic_write(path) as tmp:
            with ipc.new_file(str(tmp), table.schema, options=options) as writer:
                for start in range(0, n, ROWS_PER_BATCH):
                    writer.write_table(table.slice(start, ROWS_PER_BATCH))

    def read(self, path: Path) -> dict[str, np.ndarray]:
        with pa.memory_map(str(path)) as source:
            table = ipc.open_file(source).read_all()
        n = table.num_rows
        seq_len = table.schema.field("input_ids").type.list_size
        width = table.schema.field("topk_ids").type.value_type.list_size
        out = {}
        for field in FIELDS:
            shape = (n, seq_len, width) if field.per_slot else (n, seq_len)
            out[field.name] = from_disk(field.name, _to_numpy(table.column(field.name), shape))
        return out
