"""Load documents with ``datasets.load_dataset`` from a local file or folder, or from the hub, and read them in batches."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import DataError

BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


def _builder_for(path: Path) -> str | None:
    suffixes = [s for s in path.suffixes if s not in COMPRESSIONS]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def local_files(path: Path) -> tuple[str, list[str]]:
    """The ``datasets`` builder and the data files of a local file or folder."""
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


def _column_names(dataset) -> list[str]:
    if dataset.column_names is not None:
        return dataset.column_names
    first = next(iter(dataset.take(1)), {})  # a streamed dataset may not know its columns before the first row
    return list(first)


def load_documents(path: str, split: str, columns: dict[str, str], streaming: bool = False):
    """A ``datasets.Dataset`` (or ``IterableDataset`` when ``streaming``) of ``path``, checking ``columns`` exist."""
    import datasets

    local = Path(path).expanduser()
    try:
        if local.exists():
            builder, files = local_files(local)
            dataset = datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=streaming)
        else:
            dataset = datasets.load_dataset(path, split=split, streaming=streaming)
        names = _column_names(dataset)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; name the input either way
        where = "local data" if local.exists() else "a hub dataset (it is not a local path)"
        raise DataError(f"data.path {path!r}: could not load {where}, split {split!r}: {exc}") from exc
    for key, column in columns.items():
        if column not in names:
            raise DataError(
                f"data.{key} {column!r} is not a column of {path!r}; "
                f"its columns are {names}. Set data.{key} to one of them."
            )
    return dataset.select_columns(sorted(set(columns.values())))


def document_batches(dataset, batch_size: int) -> Iterator[dict[str, list]]:
    """Column-wise batches of at most ``batch_size`` documents, in order, holding only one batch in memory."""
    yield from dataset.iter(batch_size=batch_size)


def count_documents(dataset, batch_size: int) -> int:
    """How many documents ``dataset`` holds; a streamed one is read through once to count them."""
    if hasattr(dataset, "__len__"):
        return len(dataset)
    return sum(len(next(iter(batch.values()))) for batch in document_batches(dataset, batch_size))
