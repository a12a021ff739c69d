"""Typed config of ``distillery generate``: the model, sampling settings and output folder; the prompts come from
``data.*``. Each field's docstring documents it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config_loading import device_problem, need, raise_problems
from pipeline.data.config import DataConfig
from pipeline.models.gguf import gguf_setting


@dataclass
class GenerateConfig:
    model: str = ""
    """Local path, URL or hub id of the causal LM that writes the completions (a teacher for sequence-level KD,
    a student for on-policy rounds)."""
    gguf_file: str | None = None
    """A llama.cpp GGUF file to load the model from, as ``teacher.gguf_file``: a name in ``model``'s folder, or
    its path. The fingerprint covers the file's sha256."""
    revision: str | None = None
    """Hub revision of ``model``."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint to run. Only enable for repos you trust."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute dtype, part of the fingerprint; ``auto`` as for ``teacher.dtype``."""
    out_dir: str = ""
    """The generation folder to write (a directory or a URL): Parquet row shards, done records, ``manifest.json``."""
    local_dir: str | None = None
    """Local working directory for an ``out_dir`` at a URL. Default: ``<system temp dir>/distillery-<user>``."""
    samples_per_prompt: int = 1
    """Completions per prompt; each gets its own seed."""
    max_new_tokens: int = 128
    """The longest completion; one that reaches it ends with ``finish_reason`` ``length``."""
    temperature: float = 1.0
    """Sampling temperature; 0 is greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: draw from the smallest set of tokens whose probability reaches ``top_p``."""
    seed: int = 0
    """The draws of completion s of prompt i depend only on (seed, i, s), not on batches, parts or restarts."""
    batch_size: int = 8
    """Completions decoded together (left-padded, with a KV cache); part of the fingerprint, as padding can change
    the last bits of the logits."""
    shard_size: int = 64
    """Prompts per shard (each with all its samples): the unit of resume and of the split between parts."""
    first_prompt: int = 0
    """Skip this many prompts of ``data.path`` (an on-policy round takes its own slice); prompt indices, and so
    the seeds, stay those of the whole data."""
    max_prompts: int | None = None
    """Use at most this many prompts, from ``first_prompt`` on; ``null``: all."""
    backend: Literal["transformers"] = "transformers"
    """``transformers``: batched decoding with the model's KV cache, on CPU or GPU."""

    def __post_init__(self):
        self.model, self.gguf_file, gguf_problem = gguf_setting(self.model, self.gguf_file, "generate")
        raise_problems(
            gguf_problem,
            need(bool(self.model), "model", "is required (a model folder, a URL or a hub id)"),
            need(bool(self.out_dir), "out_dir", "is required: the folder to write the generations to"),
            need(self.samples_per_prompt >= 1, "samples_per_prompt", f"must be >= 1, got {self.samples_per_prompt}"),
            need(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}"),
            need(self.temperature >= 0, "temperature", f"must be >= 0 (0 is greedy), got {self.temperature}"),
            need(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}"),
            need(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}"),
            need(self.shard_size >= 1, "shard_size", f"must be >= 1, got {self.shard_size}"),
            need(self.first_prompt >= 0, "first_prompt", f"must be >= 0, got {self.first_prompt}"),
            need(self.max_prompts is None or self.max_prompts >= 1, "max_prompts",
                 f"must be >= 1 or null (every prompt), got {self.max_prompts}"),
        )


@dataclass
class GenerateJob:
    """Everything ``distillery generate`` needs."""

    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """The model, how it samples, and where the rows go."""
    data: DataConfig = field(default_factory=DataConfig)
    """The prompts: ``chat`` (the turns up to the last user turn), ``prompt_response`` (``prompt_field``) or
    ``text`` (the whole text)."""
    device: str = "auto"
    """``auto`` (cuda when available, else cpu), ``cpu``, ``cuda`` or ``cuda:N``."""

    def __post_init__(self):
        raise_problems(device_problem(self.device))
