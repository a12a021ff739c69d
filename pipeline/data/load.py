"""Load documents with ``datasets.load_dataset`` from a local file or folder, or from the hub."""
from __future__ import annotations

from pathlib import Path

from pipeline.errors import DataError

BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


def _builder_for(path: Path) -> str | None:
    suffixes = [s for s in path.suffixes if s not in COMPRESSIONS]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def _local_files(path: Path) -> tuple[str, list[str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and _builder_for(p))
    builders = {_builder_for(p) for p in files}
    if not files or None in builders:
        raise DataError(
            f"data.path {path}: no readable data files; expected .txt, .json, .jsonl or .parquet "
            f"(optionally compressed with {', '.join(COMPRESSIONS)})"
        )
    if len(builders) > 1:
        raise DataError(f"data.path {path} mixes file types {sorted(builders)}; use one type per folder")
    return builders.pop(), [str(p) for p in files]


def load_documents(path: str, split: str, columns: dict[str, str]):
    """Load a ``datasets.Dataset`` from a local file/folder or the hub, checking that ``columns`` exist."""
    import datasets

    local = Path(path).expanduser()
    try:
        if local.exists():
            builder, files = _local_files(local)
            dataset = datasets.load_dataset(builder, data_files={split: files}, split=split)
        else:
            dataset = datasets.load_dataset(path, split=split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; name the input either way
        where = "local data" if local.exists() else "a hub dataset (it is not a local path)"
        raise DataError(f"data.path {path!r}: could not load {where}, split {split!r}: {exc}") from exc
    for key, column in columns.items():
        if column not in dataset.column_names:
            raise DataError(
                f"data.{key} {column!r} is not a column of {path!r}; "
                f"its columns are {dataset.column_names}. Set data.{key} to one of them."
            )
    return dataset
