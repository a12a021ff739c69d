"""Packed rows in an Arrow IPC file, written one row at a time and read back as memory-mapped (n, T) numpy views.

Every row is its own record batch of one ``input_ids``, one ``loss_mask`` and one ``token_role``
fixed-size list. All batches then have the same shape, so their buffers lie
at a constant stride in the file: one strided numpy view over the memory map
covers a whole column without copying, although the file was written row by
row. Plain pyarrow reads the file as usual (``ipc.open_file(...).read_all()``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

COLUMNS = (("input_ids", pa.int32()), ("loss_mask", pa.uint8()), ("token_role", pa.uint8()))


class CorruptRowsError(ValueError):
    """A rows file that does not have the layout this module writes."""


def schema(seq_len: int) -> pa.Schema:
    return pa.schema([(name, pa.list_(dtype, seq_len)) for name, dtype in COLUMNS])


class ArrowRowsWriter:
    """A ``RowPacker`` sink writing rows to ``path`` as they are packed."""

    def __init__(self, path: Path, seq_len: int):
        self.seq_len, self.schema = seq_len, schema(seq_len)
        self._file = pa.OSFile(str(path), "wb")
        self._writer = ipc.new_file(self._file, self.schema)

    def write(self, ids: np.ndarray, mask: np.ndarray, roles: np.ndarray) -> None:
        # A fresh batch per row: a sliced batch gets a larger message, which would break the constant stride.
        for row in zip(ids, mask, roles):
            arrays = [pa.FixedSizeListArray.from_arrays(pa.array(a), self.seq_len) for a in row]
            self._writer.write_batch(pa.record_batch(arrays, schema=self.schema))

    def close(self) -> None:
        self._writer.close()
        self._file.close()


def _values_offset(batch: pa.RecordBatch, column: int, base: int) -> int:
    return batch.column(column).values.buffers()[1].address - base


def read_rows(path: Path, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero-copy, read-only (n, seq_len) views of ``input_ids`` (int32), ``loss_mask`` and ``token_role`` (uint8)
    of ``path``."""
    source = pa.memory_map(str(path), "r")
    whole = source.read_buffer()
    try:
        reader = ipc.open_file(source)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CorruptRowsError(f"{path} is not a complete Arrow file ({exc})") from None
    if reader.schema != schema(seq_len):
        raise CorruptRowsError(f"{path} holds {reader.schema}, not rows of {seq_len} tokens")
    n = reader.num_record_batches
    views = []
    for column, (_, dtype) in enumerate(COLUMNS):
        itemsize = dtype.bit_width // 8
        if n == 0:
            views.append(np.empty((0, seq_len), dtype.to_pandas_dtype()))
            continue
        first = _values_offset(reader.get_batch(0), column, whole.address)
        stride = _values_offset(reader.get_batch(1), column, whole.address) - first if n > 1 else seq_len * itemsize
        if _values_offset(reader.get_batch(n - 1), column, whole.address) != first + (n - 1) * stride:
            raise CorruptRowsError(f"{path}: rows are not evenly spaced; it was not written by this module")
        views.append(np.ndarray((n, seq_len), dtype.to_pandas_dtype(), buffer=whole, offset=first,
                                strides=(stride, itemsize)))
    return views[0], views[1], views[2]
