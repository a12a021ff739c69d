"""Everything a generation decides before the model's weights load: prompts, fingerprint, shard plan, manifest."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from pipeline import __version__
from pipeline.config_loading import to_dict
from pipeline.data.prompts import Prompt, check_lengths, load_prompts, prompts_sha256
from pipeline.generate.config import GenerateJob
from pipeline.generate.rows import SUFFIX, GenerationFolder, rows_score
from pipeline.models.decode import Sampling
from pipeline.models.device import compute_dtype, resolve_device
from pipeline.models.hf import load_config_and_tokenizer, max_positions, teacher_identity, tokenizer_sha256
from storage import Mirror, ShardPlan, ShardRecord, fingerprint, join, plan_shards

FORMAT_VERSION = 1
"""The generation folder's layout (``pipeline.generate.rows``); recorded in its manifest."""
SPLIT = "rows"
"""Shards are named ``rows-<index>.parquet``."""


@dataclass
class GeneratePlan:
    job: GenerateJob
    tokenizer: object
    prompts: list[Prompt]
    sampling: Sampling
    dtype: str
    """The compute dtype (``generate.dtype``, with ``auto`` resolved for this device)."""
    identity: dict
    """What the fingerprint hashes."""
    directory: Path | str
    shards: list[ShardPlan]

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.identity)

    @cached_property
    def folder(self) -> GenerationFolder:
        return GenerationFolder(Mirror(self.directory, self.job.generate.local_dir), self.fingerprint)

    def manifest(self, shards: list[ShardRecord]) -> dict:
        """The manifest's fields besides its shards: what made the rows, and how many there are. A shard record's
        ``sequences`` counts its prompts; it holds ``samples_per_prompt`` rows for each."""
        g = self.job.generate
        return {"format_version": FORMAT_VERSION, "kind": "generation", "fingerprint": self.fingerprint,
                "created_by": f"distillery {__version__}", "model": self.identity["model"],
                "tokenizer": {"sha256": self.identity["tokenizer_sha256"]},
                "data": {"path": self.job.data.path, "format": self.job.data.format, "prompts": len(self.prompts),
                         "prompts_sha256": self.identity["prompts_sha256"]},
                "sampling": self.identity["sampling"], "samples_per_prompt": g.samples_per_prompt,
                "dtype": self.dtype, "backend": g.backend, "rows": sum(s.sequences for s in shards) * g.samples_per_prompt,
                "tokens": sum(s.tokens for s in shards),
                "score": rows_score(self.folder, shards, self.job.data.format == "chat"),
                "fingerprint_identity": self.identity,
                "config": to_dict(self.job)}


def make_plan(job: GenerateJob) -> GeneratePlan:
    """Load the model's config and tokenizer and the prompts, check them, and fix every shard."""
    g = job.generate
    config, tokenizer = load_config_and_tokenizer(g.model, g.revision, g.trust_remote_code, key="generate.model",
                                                  local_dir=g.local_dir, gguf_file=g.gguf_file)
    prompts = load_prompts(job.data, tokenizer, g.max_prompts, g.first_prompt)
    check_lengths(prompts, g.max_new_tokens, max_positions(config))
    dtype = compute_dtype(g.dtype, resolve_device(job.device))
    sampling = Sampling(g.max_new_tokens, g.temperature, g.top_p, g.seed)
    identity = {"kind": "generation", "format_version": FORMAT_VERSION,
                "model": teacher_identity(g.model, g.revision, config, local_dir=g.local_dir, gguf_file=g.gguf_file),
                "tokenizer_sha256": tokenizer_sha256(tokenizer), "prompts_sha256": prompts_sha256(prompts),
                "data_format": job.data.format, "samples_per_prompt": g.samples_per_prompt,
                "sampling": {"max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p,
                             "seed": g.seed},
                "batch_size": g.batch_size, "shard_size": g.shard_size, "backend": g.backend, "dtype": dtype}
    shards = plan_shards({SPLIT: len(prompts)}, g.shard_size, SUFFIX)
    return GeneratePlan(job, tokenizer, prompts, sampling, dtype, identity, join(g.out_dir), shards)
