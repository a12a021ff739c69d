"""Zarr v3 shard backend: one group per shard, one array per column.

Arrays are chunked along sequences, so ``zarr.open_group`` reads a shard
directly and a reader can fetch a few sequences without decoding the rest.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from storage.io.atomic import atomic_write

SEQUENCES_PER_CHUNK = 64


class ZarrBackend:
    name = "zarr"
    suffix = ".zarr"

    def write(self, path: Path, columns: dict[str, np.ndarray], level: int) -> None:
        rows = min(len(columns["input_ids"]), SEQUENCES_PER_CHUNK)
        with atomic_write(path) as tmp:
            group = zarr.open_group(store=str(tmp), mode="w", zarr_format=3)
            group.attrs["distillery_shard"] = 1
            group.attrs["columns"] = list(columns)  # the order they were written in, as Arrow keeps it
            for name, data in columns.items():
                target = group.create_array(name, shape=data.shape, chunks=(rows, *data.shape[1:]), dtype=data.dtype,
                                            compressors=ZstdCodec(level=level), fill_value=0)
                target[...] = data

    def read(self, path: Path) -> dict[str, np.ndarray]:
        group = zarr.open_group(store=str(path), mode="r")
        names = group.attrs.get("columns") or sorted(group.array_keys())
        return {name: np.asarray(group[name][...]) for name in names}
