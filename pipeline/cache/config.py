"""Typed config of stage 1, ``distillery cache``: teacher, cache settings and the job; each field's docstring documents it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config_loading import device_problem, need, raise_problems
from pipeline.data.config import DataConfig
from pipeline.models.gguf import gguf_setting
from storage import DEFAULT_LOCAL_BYTES, FORMAT_VERSIONS, MAX_SAMPLES


@dataclass
class TeacherConfig:
    model: str = ""
    """Local path or hub id of a causal LM, loaded with ``AutoModelForCausalLM.from_pretrained``."""
    gguf_file: str | None = None
    """A llama.cpp GGUF file to load the teacher from (config, tokenizer with its chat template, and weights,
    dequantised into ``dtype``; needs the ``gguf`` extra): a file name in ``model``'s folder, or the file's path
    (then ``model`` may be left out, or must be the folder holding it). The fingerprint covers the file's sha256.
    It applies to ``model`` only: in ``distillery run`` a round whose teacher is a previous student does not
    inherit it."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load; recorded in the manifest."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute dtype of the teacher pass, part of the cache's fingerprint. ``auto``: bf16 where the device runs it
    natively (a GPU with bf16, a CPU with AVX-512-BF16 or AMX), else fp16 on a GPU and fp32 on a CPU."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint to run. Only enable for repos you trust."""
    device_map: str | None = None
    """Passed to ``from_pretrained``: ``auto`` spreads the layers over this part's ``gpus_per_part`` GPUs with
    accelerate, for a teacher larger than one GPU; ``null`` puts the whole teacher on ``device``."""
    gpus_per_part: int = 1
    """GPUs each part (torchrun rank or Slurm task) owns: local rank r uses GPUs r*g to r*g+g-1. Needs
    ``device_map`` when above 1."""
    parallel: Literal["none", "tensor"] = "none"
    """``tensor``: transformers' tensor parallelism (``tp_plan: auto``) over all torchrun ranks of a job, which
    then form one part whose rank 0 writes the shards; for architectures that ship a TP plan."""

    def __post_init__(self):
        raise_problems(
            self._split_gguf_path(),  # first: it may fill in ``model``
            need(bool(self.model), "model", "is required (a local path or a hub id)"),
            need(self.gpus_per_part >= 1, "gpus_per_part", f"must be >= 1, got {self.gpus_per_part}"),
            need(self.gpus_per_part <= 1 or self.device_map is not None, "gpus_per_part",
                 "above 1 needs teacher.device_map (e.g. auto) to spread the teacher over them"),
            need(not (self.device_map and self.parallel == "tensor"), "parallel",
                 "tensor parallelism places the weights itself; unset teacher.device_map"),
        )

    def _split_gguf_path(self) -> tuple[str, str] | None:
        """Turn a ``gguf_file`` path into ``model`` (its folder) and ``gguf_file`` (its name)."""
        self.model, self.gguf_file, problem = gguf_setting(self.model, self.gguf_file, "teacher")
        return problem


@dataclass
class CacheConfig:
    dir: str | None = None
    """Cache directory. If unset, ``<root>/<fingerprint>`` is used."""
    root: str | None = None
    """Directory holding caches by fingerprint, shared between experiments. ``dir`` and ``root`` may be URLs
    (``s3://bucket/prefix``, ``gs://...``, any installed fsspec protocol)."""
    local_dir: str | None = None
    """Local working directory for caches at URLs: the token store, each shard until it is uploaded, and
    (for training) the local copies of remote shards. Default: ``<system temp dir>/distillery-<user>``."""
    local_bytes: int = DEFAULT_LOCAL_BYTES
    """Byte budget of the local copies of remote shards that training keeps (least recently used go first);
    used by ``distillery run``'s training stages."""
    format: Literal["arrow", "zarr"] = "arrow"
    """Shard backend: Arrow IPC files or Zarr v3 groups."""
    mode: Literal["topk", "sample", "hybrid"] = "sample"
    """``sample``: unbiased draws (recommended); ``topk``: top-k ids plus tail mass;
    ``hybrid``: the exact top-k head plus an unbiased sample of the tail."""
    top_k: int = 64
    """Ids stored per position in ``topk`` mode, and the exact head in ``hybrid`` mode."""
    samples: int = 50
    """Draws per position (with replacement) in ``sample`` mode, and of the tail in ``hybrid`` mode."""
    sampler: Literal["multinomial", "systematic"] = "multinomial"
    """How the N draws are made; both give unbiased weights (count / N averages to the teacher's probability).
    ``multinomial``: N independent draws. ``systematic``: one uniform u per position and draws at (j + u) / N,
    so an id's count is floor(N p) or ceil(N p). In ``make study`` systematic sample-50 students ended closer
    to online KD on the 7.6M demo teacher (KL 1.20 times online KD's against 1.26, better in 3 of 3 seeds) and
    slightly further on SmolLM2-135M (1.06 against 1.04, worse in 3 of 3), hence not the default."""
    temperature: float = 1.0
    """Teacher temperature T: targets are softmax(logits / T)."""
    shard_size: int = 256
    """Sequences per shard file."""
    batch_size: int = 8
    """Sequences per teacher forward pass."""
    chunk_size: int = 256
    """Positions per lm_head chunk. Peak extra memory is about chunk_size x vocab x 12 bytes; small
    chunks also stay in CPU cache (256 ran 2x faster than 4096 on CPU)."""
    compression_level: int = 9
    """zstd level (1-22) for both backends. 9 made format-3 caches 4-5 % smaller than 3 and still wrote 87k-135k
    tokens/s per writer thread on a 2-core Xeon; 19 saved a few % more at a tenth of the speed."""
    format_version: int = 3
    """Shard layout: 3 (one schema per cache, sampled weights as counts, ids sorted and delta coded in byte
    planes) or 2 (the earlier layout, for tools written against it); Distillery reads both."""
    logprob_bits: Literal[16, 8] = 16
    """Bits per stored head log-prob in ``topk`` and ``hybrid`` mode: 16 (float16) or 8 (a per-position
    offset and scale in log space, then uint8 codes); the tail mass stays float32. Format 3 only."""
    seed: int = 0
    """Seed of ``sample`` mode; the draws for a sequence depend only on it and the sequence index."""
    text_alignment: bool = True
    """Store ``token_role`` (1 byte per token before compression, 0.0044 after on SmolLM2's top-32 study cache), which marks the EOS that
    packing adds and the padding, so that each sequence's exact text can be spelled again and students with other
    tokenizers train from this cache (``student.tokenizer``). False gives a cache for same-tokenizer students only."""

    def __post_init__(self):
        raise_problems(
            need(not (self.dir and self.root), "dir", "set cache.dir or cache.root, not both"),
            need(bool(self.dir or self.root), "dir", "set cache.dir (a directory) or cache.root (a fingerprint-keyed store)"),
            need(self.top_k >= 1, "top_k", f"must be >= 1, got {self.top_k}"),
            need(self.local_bytes >= 1, "local_bytes", f"must be >= 1 (bytes), got {self.local_bytes}"),
            need(self.samples >= 1, "samples", f"must be >= 1, got {self.samples}"),
            need(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}"),
            need(self.shard_size >= 1, "shard_size", f"must be >= 1, got {self.shard_size}"),
            need(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}"),
            need(self.chunk_size >= 1, "chunk_size", f"must be >= 1, got {self.chunk_size}"),
            need(1 <= self.compression_level <= 22, "compression_level", f"must be in [1, 22], got {self.compression_level}"),
            need(self.format_version in FORMAT_VERSIONS, "format_version",
                 f"must be one of {list(FORMAT_VERSIONS)}, got {self.format_version}"),
            need(self.logprob_bits in (16, 8), "logprob_bits", f"must be 16 or 8, got {self.logprob_bits}"),
            need(self.logprob_bits == 16 or self.format_version == 3, "logprob_bits",
                 "8-bit log-probs need cache.format_version=3"),
            need(self.logprob_bits == 16 or self.mode != "sample", "logprob_bits",
                 "sample mode stores counts, not log-probs; use 8 bits with cache.mode=topk or hybrid"),
            need(self.samples <= MAX_SAMPLES or self.mode == "topk", "samples",
                 f"must be at most {MAX_SAMPLES} (counts are stored as uint16), got {self.samples}"),
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
        raise_problems(device_problem(self.device))
