"""Arrow IPC shard backend: one file, one row per sequence.

A column of per-sequence shape (T,) is ``fixed_size_list<T>``, and one of shape (T, W) is
``fixed_size_list<fixed_size_list<W>>[T]``, so ``pyarrow.ipc.open_file``, ``pyarrow.dataset`` and
``datasets.load_dataset("arrow", ...)`` read shards with no Distillery code.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from storage.io.atomic import atomic_write

ROWS_PER_BATCH = 64


def _column(array: np.ndarray) -> pa.Array:
    """Nest a C-contiguous (n, T[, W]) array into fixed-size lists, row = sequence."""
    values: pa.Array = pa.array(np.ascontiguousarray(array).reshape(-1))
    for size in reversed(array.shape[1:]):
        values = pa.FixedSizeListArray.from_arrays(values, size)
    return values


def to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A column of nested fixed-size lists -> an (n, T[, W]) array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    shape, values = [len(column)], column
    while pa.types.is_fixed_size_list(values.type):
        shape.append(values.type.list_size)
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False).reshape(shape)


class ArrowBackend:
    name = "arrow"
    suffix = ".arrow"

    def write(self, path: Path, columns: dict[str, np.ndarray], level: int) -> None:
        n = len(columns["input_ids"])
        table = pa.table({name: _column(array) for name, array in columns.items()})
        options = ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=level))
        with atomic_write(path) as tmp:
            with ipc.new_file(str(tmp), table.schema, options=options) as writer:
                for start in range(0, n, ROWS_PER_BATCH):
                    writer.write_table(table.slice(start, ROWS_PER_BATCH))

    def read(self, path: Path) -> dict[str, np.ndarray]:
        with pa.memory_map(str(path)) as source:
            table = ipc.open_file(source).read_all()
        return {name: to_numpy(table.column(name)) for name in table.column_names}
