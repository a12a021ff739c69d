"""Typed configs for the pipeline stages. Each field's docstring is its documentation.

Load with ``load_config(CacheJob, path, overrides)``; every unknown key, wrong
type or out-of-range value is reported in one ``ConfigError``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config_loading import raise_problems


def _need(ok: bool, key: str, message: str) -> tuple[str, str] | None:
    return None if ok else (key, message)


@dataclass
class TeacherConfig:
    model: str = ""
    """Local path or hub id of a causal LM, loaded with ``AutoModelForCausalLM.from_pretrained``."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load; recorded in the manifest."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Weight dtype for the teacher pass; ``auto`` keeps the checkpoint's dtype."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint to run. Only enable for repos you trust."""

    def __post_init__(self):
        raise_problems(_need(bool(self.model), "model", "is required (a local path or a hub id)"))


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
    seed: int = 0
    """Seed of the held-out document selection."""
    num_proc: int = 1
    """Processes for tokenization (``datasets.map``)."""

    def __post_init__(self):
        raise_problems(
            _need(bool(self.path), "path", "is required (a file, a folder or a hub dataset id)"),
            _need(self.seq_len >= 2, "seq_len", f"must be >= 2, got {self.seq_len}"),
            _need(0.0 <= self.holdout_fraction < 1.0, "holdout_fraction", f"must be in [0, 1), got {self.holdout_fraction}"),
            _need(
                not (self.eval_path and self.holdout_fraction > 0),
                "eval_path",
                "set either eval_path or holdout_fraction, not both",
            ),
            _need(self.max_tokens is None or self.max_tokens >= self.seq_len, "max_tokens", "must be >= seq_len"),
            _need(self.num_proc >= 1, "num_proc", f"must be >= 1, got {self.num_proc}"),
        )


@dataclass
class CacheConfig:
    dir: str | None = None
    """Cache directory. If unset, ``<root>/<fingerprint>`` is used."""
    root: str | None = None
    """Directory holding caches by fingerprint, shared between experiments."""
    format: Literal["arrow", "zarr"] = "arrow"
    """Shard backend: Arrow IPC files or Zarr v3 groups."""
    mode: Literal["topk", "sample", "hybrid"] = "sample"
    """``sample``: unbiased draws (recommended); ``topk``: top-k ids plus tail mass;
    ``hybrid``: the exact top-k head plus an unbiased sample of the tail."""
    top_k: int = 64
    """Ids stored per position in ``topk`` mode, and the exact head in ``hybrid`` mode."""
    samples: int = 50
    """Draws per position (with replacement) in ``sample`` mode, and of the tail in ``hybrid`` mode."""
    temperature: float = 1.0
    """Teacher temperature T: targets are softmax(logits / T)."""
    shard_size: int = 256
    """Sequences per shard file."""
    batch_size: int = 8
    """Sequences per teacher forward pass."""
    chunk_size: int = 256
    """Positions per lm_head chunk. Peak extra memory is about chunk_size x vocab x 12 bytes; small
    chunks also stay in CPU cache (256 ran 2x faster than 4096 on CPU)."""
    compression_level: int = 3
    """zstd level (1-22) for both backends."""
    seed: int = 0
    """Seed of ``sample`` mode; the draws for a sequence depend only on it and the sequence index."""

    def __post_init__(self):
        raise_problems(
            _need(not (self.dir and self.root), "dir", "set cache.dir or cache.root, not both"),
            _need(bool(self.dir or self.root), "dir", "set cache.dir (a directory) or cache.root (a fingerprint-keyed store)"),
            _need(self.top_k >= 1, "top_k", f"must be >= 1, got {self.top_k}"),
            _need(self.samples >= 1, "samples", f"must be >= 1, got {self.samples}"),
            _need(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}"),
            _need(self.shard_size >= 1, "shard_size", f"must be >= 1, got {self.shard_size}"),
            _need(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}"),
            _need(self.chunk_size >= 1, "chunk_size", f"must be >= 1, got {self.chunk_size}"),
            _need(1 <= self.compression_level <= 22, "compression_level", f"must be in [1, 22], got {self.compression_level}"),
        )

@dataclass
class CacheJob:
    """Everything ``distillery cache`` needs."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The model whose soft targets are cached."""
    data: DataConfig = field(default_factory=DataConfig)
    """The text the teacher is run over."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """What to store and where."""
    device: str = "auto"
    """``auto`` (cuda when available, else cpu), ``cpu``, ``cuda`` or ``cuda:N``."""

    def __post_init__(self):
        ok = self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
        raise_problems(_need(ok, "device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}"))
