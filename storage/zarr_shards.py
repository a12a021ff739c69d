"""Zarr v3 shard backend: one group per shard, one array per field.

Arrays are chunked along sequences, so ``zarr.open_group`` reads a shard
directly and a reader can fetch a few sequences without decoding the rest.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from storage.atomic import atomic_write
from storage.schema import FIELDS, check_arrays, from_disk, to_disk

SEQUENCES_PER_CHUNK = 64


class ZarrFormat:
    name = "zarr"
    suffix = ".zarr"

    def write(self, path: Path, arrays: dict[str, np.ndarray], level: int) -> None:
        n, _, _ = check_arrays(arrays)
        rows = min(n, SEQUENCES_PER_CHUNK)
        with atomic_write(path) as tmp:
            group = zarr.open_group(store=str(tmp), mode="w", zarr_format=3)
            group.attrs["distillery_shard"] = 1
            for field in FIELDS:
                data = to_disk(field.name, arrays[field.name])
                target = group.create_array(
                    field.name,
                    shape=data.shape,
                    chunks=(rows, *data.shape[1:]),
                    dtype=data.dtype,
                    compressors=ZstdCodec(level=level),
                    fill_value=0,
                )
                target[...] = data

    def read(self, path: Path) -> dict[str, np.ndarray]:
        group = zarr.open_group(store=str(path), mode="r")
        return {f.name: from_disk(f.name, np.asarray(group[f.name][...])) for f in FIELDS}
