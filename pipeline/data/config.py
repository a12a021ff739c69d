"""Typed config of the data every stage reads: source, format, packing and held-out split."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config_loading import need, raise_problems


@dataclass
class DataConfig:
    path: str = ""
    """A .txt/.jsonl/.json/.parquet file (optionally .gz), a folder of them, or a hub dataset id."""
    split: str = "train"
    """Dataset split to read."""
    text_field: str = "text"
    """Column that holds the document text (.txt files always use ``text``)."""
    format: Literal["text", "chat", "prompt_response"] = "text"
    """``text``: train on every token; ``chat``: only assistant turns of ``messages_field``, rendered with the
    tokenizer's chat template; ``prompt_response``: only ``response_field`` after ``prompt_field``."""
    messages_field: str = "messages"
    """Column of chat conversations (lists of ``{role, content}``) for ``format: chat``."""
    prompt_field: str = "prompt"
    """Prompt column for ``format: prompt_response``."""
    response_field: str = "response"
    """Response column for ``format: prompt_response``."""
    seq_len: int = 512
    """Tokens per packed sequence; must not exceed the teacher's maximum positions."""
    holdout_fraction: float = 0.0
    """Fraction of documents (chosen with ``seed``) cached as the ``eval`` split."""
    eval_path: str | None = None
    """A separate dataset for the ``eval`` split; excludes ``holdout_fraction``."""
    eval_split: str | None = None
    """Split of ``eval_path`` to read; defaults to ``split``."""
    max_tokens: int | None = None
    """Keep at most this many training tokens (whole sequences); ``null`` keeps all."""
    eval_max_tokens: int | None = None
    """Keep at most this many held-out tokens (whole sequences, from the first held-out documents); ``null``
    keeps all. Long documents make a small ``holdout_fraction`` many tokens, which the teacher pass pays for."""
    seed: int = 0
    """Seed of the held-out document selection."""
    num_proc: int = 1
    """Processes for tokenization."""
    streaming: bool = False
    """Read documents with ``datasets`` streaming (an ``IterableDataset``): nothing is downloaded or converted
    up front. ``holdout_fraction`` then reads the data twice, once to count the documents."""

    def __post_init__(self):
        raise_problems(
            need(bool(self.path), "path", "is required (a file, a folder or a hub dataset id)"),
            need(self.seq_len >= 2, "seq_len", f"must be >= 2, got {self.seq_len}"),
            need(0.0 <= self.holdout_fraction < 1.0, "holdout_fraction", f"must be in [0, 1), got {self.holdout_fraction}"),
            need(
                not (self.eval_path and self.holdout_fraction > 0),
                "eval_path",
                "set either eval_path or holdout_fraction, not both",
            ),
            need(self.max_tokens is None or self.max_tokens >= self.seq_len, "max_tokens", "must be >= seq_len"),
            need(self.eval_max_tokens is None or self.eval_max_tokens >= self.seq_len, "eval_max_tokens",
                 "must be >= seq_len (or null: every held-out token)"),
            need(self.num_proc >= 1, "num_proc", f"must be >= 1, got {self.num_proc}"),
        )
