"""Load documents with ``datasets.load_dataset`` from a local file or folder, or from the hub, and read them in batches."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import DataError
from pipeline.log import progress_bars
from pipeline.models.hf import looks_local

BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


def _builder_for(path: Path) -> str | None:
    suffixes = [s for s in path.suffixes if s not in COMPRESSIONS]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def local_files(path: Path, key: str = "data.path") -> tuple[str, list[str]]:
    """The ``datasets`` builder and the data files of a local file or folder (named by the setting ``key``)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and _builder_for(p))
    builders = {_builder_for(p) for p in files}
    if not files or None in builders:
        raise DataError(
            f"{key} {path}: no readable data files; expected .txt, .json, .jsonl or .parquet "
            f"(optionally compressed with {', '.join(COMPRESSIONS)})"
        )
    if len(builders) > 1:
        raise DataError(f"{key} {path} mixes file types {sorted(builders)}; use one type per folder")
    if not any(p.stat().st_size for p in files):  # datasets fails on an empty .jsonl file without a message
        raise DataError(f"{key} {path} is empty; give a file with documents")
    return builders.pop(), [str(p) for p in files]


def _column_names(dataset) -> list[str]:
    if dataset.column_names is not None:
        return dataset.column_names
    first = next(iter(dataset.take(1)), {})  # a streamed dataset may not know its columns before the first row
    return list(first)


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def not_utf8(key: str, path: str, exc: UnicodeDecodeError) -> DataError:
    return DataError(f"{key} {path!r} is not UTF-8 text ({exc}); convert it to UTF-8, e.g. with iconv -t utf-8")


def _load_error(key: str, path: str, split: str, exc: Exception) -> DataError:
    """One ``DataError`` naming the input and the innermost cause (datasets wraps it, e.g. in a generation error)."""
    causes = list(_causes(exc))
    undecodable = next((c for c in causes if isinstance(c, UnicodeDecodeError)), None)
    if undecodable is not None:
        return not_utf8(key, path, undecodable)
    where = "local data" if Path(path).expanduser().exists() else "a hub dataset (it is not a local path)"
    reason = str(exc) if len(causes) == 1 else f"{exc} ({causes[-1]})"
    return DataError(f"{key} {path!r}: could not load {where}, split {split!r}: {reason}")


@contextmanager
def quiet_datasets():
    """While ``datasets`` loads: no progress bars under ``--quiet``, and no log of the errors it logs just before
    raising them, since the raise is reported as one ``DataError`` line."""
    import datasets

    quiet = not progress_bars() and not datasets.utils.are_progress_bars_disabled()
    if quiet:
        datasets.disable_progress_bars()
    handlers = logging.getLogger("datasets").handlers
    for handler in handlers:
        handler.addFilter(_below_error)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(_below_error)
        if quiet:
            datasets.enable_progress_bars()


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


def load_documents(path: str, split: str, columns: dict[str, str], streaming: bool = False, key: str = "data.path",
                   optional: tuple[str, ...] = ()):
    """A ``datasets.Dataset`` (or ``IterableDataset`` when ``streaming``) of ``path``, checking ``columns`` exist;
    the ``optional`` columns are kept where the data has them.

    ``key`` is the setting that names ``path``, for the messages of errors.
    """
    import datasets

    local = Path(path).expanduser()
    if looks_local(path) and not local.exists():
        raise DataError(f"{key} {path!r} does not exist; give a data file, a folder of them or a hub dataset id")
    try:
        with quiet_datasets():
            if local.exists():
                builder, files = local_files(local, key)
                dataset = datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=streaming)
            else:
                dataset = datasets.load_dataset(path, split=split, streaming=streaming)
        names = _column_names(dataset)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; name the input either way
        raise _load_error(key, path, split, exc) from exc
    for field, column in columns.items():
        if column not in names:
            raise DataError(
                f"data.{field} {column!r} is not a column of {path!r}; "
                f"its columns are {names}. Set data.{field} to one of them."
            )
    return dataset.select_columns(sorted(set(columns.values()) | {c for c in optional if c in names}))


def document_batches(dataset, batch_size: int) -> Iterator[dict[str, list]]:
    """Column-wise batches of at most ``batch_size`` documents, in order, holding only one batch in memory."""
    yield from dataset.iter(batch_size=batch_size)


def count_documents(dataset, batch_size: int) -> int:
    """How many documents ``dataset`` holds; a streamed one is read through once to count them."""
    if hasattr(dataset, "__len__"):
        return len(dataset)
    return sum(len(next(iter(batch.values()))) for batch in document_batches(dataset, batch_size))
