"""The ``distillery`` logger: one line per message on stderr, prefixed ``[distillery <stage>]``."""
from __future__ import annotations

import logging
import sys

ROOT = "distillery"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each message (test capture swaps it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _StageFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stage = record.name.removeprefix(ROOT).lstrip(".")
        prefix = f"[{ROOT} {stage}]" if stage else f"[{ROOT}]"
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"{prefix} {level}{record.getMessage()}"


def _configure() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(_StageFormatter())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return root


def get_logger(stage: str) -> logging.Logger:
    """The logger of one stage, e.g. ``get_logger("cache")`` prints ``[distillery cache] ...``."""
    _configure()
    return logging.getLogger(f"{ROOT}.{stage}")


def set_verbosity(level: int) -> None:
    """-1: warnings only (``--quiet``), no progress bars; 0: progress messages and bars; 1: debug detail (``-v``)."""
    _configure().setLevel({-1: logging.WARNING, 0: logging.INFO}.get(level, logging.DEBUG))
    # transformers' own bars (loading weights) and the hub's (downloads) follow: a refusal found after a model
    # loads must still be one line on stderr. Imported only when quiet, or when already loaded.
    if level < 0 or "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        (hf_logging.disable_progress_bar if level < 0 else hf_logging.enable_progress_bar)()


def progress_bars() -> bool:
    """Whether progress bars are drawn: not under ``--quiet``."""
    return _configure().level <= logging.INFO
