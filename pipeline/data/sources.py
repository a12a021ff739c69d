"""Which documents go to which split, in order, one batch at a time, and their encoding (in worker processes with ``num_proc``)."""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from pipeline.data.config import DataConfig
from pipeline.data.encode import required_columns
from pipeline.data.generations import generation_documents, open_generation
from pipeline.data.load import count_documents, document_batches, load_documents, not_utf8
from pipeline.errors import DataError

BATCH_DOCUMENTS = 256
"""Documents read and tokenized together. The fast tokenizer holds about 100 bytes per token of a batch (1,000
documents of 600 tokens took 60 MB), which bounds stage 1's memory; 256 still keeps its threads busy."""


def split_names(cfg: DataConfig) -> list[str]:
    return ["train", "eval"] if cfg.eval_path or cfg.holdout_fraction > 0 else ["train"]


def holdout_indices(n_docs: int, fraction: float, seed: int) -> np.ndarray:
    n_eval = max(1, round(n_docs * fraction))
    if n_eval >= n_docs:
        raise DataError(
            f"data.holdout_fraction {fraction} of {n_docs} documents leaves nothing to train on; lower it"
        )
    return np.sort(np.random.default_rng(seed).permutation(n_docs)[:n_eval])


def _take(batch: dict[str, list], rows: np.ndarray) -> dict[str, list]:
    return {key: [values[i] for i in rows] for key, values in batch.items()}


def _size(batch: dict[str, list]) -> int:
    return len(next(iter(batch.values())))


def _whole(documents, name: str, full: Callable[[], bool]) -> Iterator[tuple[str, dict]]:
    for batch in document_batches(documents, BATCH_DOCUMENTS):
        if full():
            return
        yield name, batch


def _held_out(documents, cfg: DataConfig, full: Callable[[], bool]) -> Iterator[tuple[str, dict]]:
    """Train and eval batches of one dataset: eval is the seeded choice of whole documents, both keep their order."""
    import datasets

    held = holdout_indices(count_documents(documents, BATCH_DOCUMENTS), cfg.holdout_fraction, cfg.seed)
    start = 0
    for batch in document_batches(documents, BATCH_DOCUMENTS):
        index = np.arange(start, start + _size(batch))
        start += len(index)
        position = np.minimum(np.searchsorted(held, index), len(held) - 1)
        is_held = held[position] == index
        if not full():
            if not is_held.all():
                yield "train", _take(batch, np.flatnonzero(~is_held))
        elif isinstance(documents, datasets.Dataset):  # random access: read only the held-out documents left
            rest = documents.select(held[held >= index[0]])
            yield from (("eval", b) for b in document_batches(rest, BATCH_DOCUMENTS))
            return
        elif index[0] > held[-1]:
            return
        if is_held.any():
            yield "eval", _take(batch, np.flatnonzero(is_held))


def _documents(key: str, cfg: DataConfig):
    """The documents of the dataset that ``key`` (``data.path`` or ``data.eval_path``) names."""
    path, split = (cfg.path, cfg.split) if key == "data.path" else (cfg.eval_path, cfg.eval_split or cfg.split)
    generation = open_generation(path, key, verify=True)
    if generation is not None:
        return generation_documents(generation, split)
    documents = load_documents(path, split, required_columns(cfg), cfg.streaming, key)
    if not cfg.streaming and len(documents) == 0:  # a streamed one is found empty when nothing was packed
        raise DataError(f"{key} {path!r} split {split!r} is empty")
    return documents


@contextmanager
def _decoding(key: str, path: str):
    """Text that is not UTF-8 may only fail when a batch of it is decoded (a .jsonl file): name the file then."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise not_utf8(key, path, exc) from None


def _split_batches(cfg: DataConfig, full: Callable[[], bool]) -> Iterator[tuple[str, dict]]:
    with _decoding("data.path", cfg.path):
        documents = _documents("data.path", cfg)
        if cfg.holdout_fraction > 0:
            yield from _held_out(documents, cfg, full)
            return
        yield from _whole(documents, "train", full)
    if cfg.eval_path:
        with _decoding("data.eval_path", cfg.eval_path):
            yield from _whole(_documents("data.eval_path", cfg), "eval", lambda: False)


_worker_encoder: Callable | None = None  # set once per worker process, so batches do not carry the tokenizer


def _set_worker_encoder(encoder: Callable) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def _encode_in_worker(batch: dict) -> dict:
    return _worker_encoder(batch)


def routed_batches(cfg: DataConfig, encoder: Callable[[dict], dict],
                   full: Callable[[], bool]) -> Iterator[tuple[str, dict]]:
    """``(split, encoded batch)`` in document order; training documents stop being read once ``full()``."""
    batches = _split_batches(cfg, full)
    if cfg.num_proc == 1:
        yield from ((name, encoder(batch)) for name, batch in batches)
        return
    import multiprocess  # what datasets.map uses: it pickles the encoder's closure where fork is not available

    with multiprocess.Pool(cfg.num_proc, initializer=_set_worker_encoder, initargs=(encoder,)) as pool:
        while window := list(itertools.islice(batches, 2 * cfg.num_proc)):  # a bounded read-ahead
            names = [name for name, _ in window]
            yield from zip(names, pool.map(_encode_in_worker, [batch for _, batch in window]))
