"""Stage 1's plan: everything decided before the teacher's weights load (data, fingerprint, shards, header)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline import __version__
from pipeline.cache.config import CacheJob
from pipeline.cache.reduce import slot_width
from pipeline.config_loading import to_dict
from pipeline.data.pack import PackedSplit, data_identity
from pipeline.data.store import TokenStore, token_store
from pipeline.errors import ConfigError, DataError, TeacherError
from pipeline.models.device import compute_dtype, resolve_device
from pipeline.models.hf import load_config_and_tokenizer, max_positions, teacher_identity, tokenizer_sha256
from storage import (
    CacheDirectory,
    Layout,
    Manifest,
    Mirror,
    ShardPlan,
    ensure_writable,
    fingerprint,
    get_backend,
    join,
    plan_shards,
)


@dataclass
class CachePlan:
    """Everything decided before the teacher's weights are loaded."""

    job: CacheJob
    tokenizer: object
    splits: dict[str, PackedSplit]
    vocab_size: int
    width: int
    header: Manifest
    """The manifest without its shards; ``CacheDirectory.assemble`` completes it."""
    layout: Layout
    """How every shard stores its targets."""
    teacher_dtype: str
    """The dtype the teacher computes in (``teacher.dtype``, with ``auto`` resolved for this device)."""
    directory: Path | str
    """The cache's location: a local path, or a URL."""
    shards: list[ShardPlan]

    @property
    def fingerprint(self) -> str:
        return self.header.fingerprint

    @property
    def cache(self) -> CacheDirectory:
        return CacheDirectory(Mirror(self.directory, self.job.cache.local_dir), self.fingerprint)


def _check_against_model(job: CacheJob, hf_config) -> int:
    """Validate settings that depend on the teacher; return its output vocab size."""
    vocab_size = getattr(hf_config, "vocab_size", None)
    if not isinstance(vocab_size, int):
        raise TeacherError(f"teacher.model {job.teacher.model!r}: its config has no integer vocab_size")
    problems = []
    limit = max_positions(hf_config)
    if limit is not None and job.data.seq_len > limit:
        problems.append(f"data.seq_len: {job.data.seq_len} exceeds the teacher's maximum positions ({limit})")
    if job.cache.mode in ("topk", "hybrid") and job.cache.top_k > vocab_size - (job.cache.mode == "hybrid"):
        problems.append(f"cache.top_k: {job.cache.top_k} exceeds the teacher's vocab size ({vocab_size})")
    if problems:
        raise ConfigError("invalid config for this teacher:\n  - " + "\n  - ".join(problems))
    return vocab_size


def _fingerprint_identity(job: CacheJob, teacher: dict, tokenizer_hash: str, data: dict, width: int,
                          teacher_dtype: str) -> dict:
    """What the fingerprint hashes: every setting that changes the bytes of a shard."""
    c = job.cache
    return {
        "format_version": c.format_version,
        "logprob_bits": c.logprob_bits if c.mode != "sample" else None,
        "teacher": {k: teacher[k] for k in ("weights_sha256",)} if teacher["weights_sha256"] else teacher,
        "teacher_dtype": teacher_dtype,  # resolved: an auto bf16 cache and an auto fp32 one differ
        "tokenizer_sha256": tokenizer_hash,
        "data_sha256": data["sha256"],
        "seq_len": job.data.seq_len,
        "mode": c.mode,
        "width": width,
        "top_k": c.top_k if c.mode != "sample" else None,
        "samples": c.samples if c.mode != "topk" else None,
        "seed": c.seed if c.mode != "topk" else None,
        # Left out for multinomial draws, the only kind before cache.sampler existed, so those caches keep
        # their fingerprints and are still found.
        **({"sampler": c.sampler} if c.mode != "topk" and c.sampler != "multinomial" else {}),
        # Left out when off, so caches made before text alignment existed keep their fingerprints.
        **({"text_alignment": 1} if c.text_alignment else {}),
        "temperature": c.temperature,
        "format": c.format,
        "shard_size": c.shard_size,
    }


def _header(job: CacheJob, hf_config, tokenizer, layout: Layout, teacher: dict, data: dict,
            identity: dict) -> Manifest:
    c = job.cache
    v3 = layout.version == 3
    return Manifest(
        format_version=layout.version,
        fingerprint=fingerprint(identity),
        created_by=f"distillery {__version__}",
        teacher={**teacher, "dtype": identity["teacher_dtype"], "model_type": getattr(hf_config, "model_type", None)},
        tokenizer={"sha256": identity["tokenizer_sha256"], "length": len(tokenizer),
                   "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        vocab_size=layout.vocab_size,
        dataset=data,
        seq_len=job.data.seq_len,
        mode=c.mode,
        top_k=c.top_k if c.mode != "sample" else None,
        samples=c.samples if c.mode != "topk" else None,
        seed=c.seed,
        width=layout.head_width + layout.sample_width,
        temperature=c.temperature,
        format=get_backend(c.format).name,
        compression={"codec": "zstd", "level": c.compression_level},
        dtypes=layout.columns(),
        id_storage=(f"{layout.id_dtype} for every shard; per-slot columns sorted by id, delta coded, in byte planes"
                    if v3 else "uint16 per shard and field when every id < 65535 (padding -1 as 65535), else int32"),
        pad_id=layout.pad_id if v3 else None,
        logprob_bits=c.logprob_bits if v3 and c.mode != "sample" else None,
        text_alignment=1 if layout.token_roles else None,
        fingerprint_identity=identity,
        config=to_dict(job),
    )


def _store_root(job: CacheJob) -> Path:
    """The directory the user named (its local working copy for a URL): the token store lives there, shared by
    every cache of a ``cache.root``."""
    return Mirror(job.cache.dir or job.cache.root, job.cache.local_dir).local


def prepare_tokens(job: CacheJob) -> tuple[object, object, int, TokenStore]:
    """Load the teacher's config and tokenizer, check them, and open (or build) the token store of ``job.data``."""
    ensure_writable(_store_root(job), "cache.dir" if job.cache.dir else "cache.root")
    if job.cache.dir:
        CacheDirectory.refuse_foreign(Mirror(job.cache.dir, job.cache.local_dir))  # before the token store goes into someone else's folder
    t = job.teacher
    hf_config, tokenizer = load_config_and_tokenizer(t.model, t.revision, t.trust_remote_code,
                                                     local_dir=job.cache.local_dir, gguf_file=t.gguf_file)
    vocab_size = _check_against_model(job, hf_config)
    store = token_store(_store_root(job), job.data, tokenizer, tokenizer_sha256(tokenizer))
    if store.max_id >= vocab_size:
        raise DataError(f"token id {store.max_id} from the tokenizer is outside the teacher's vocab ({vocab_size})")
    return hf_config, tokenizer, vocab_size, store


def make_plan(job: CacheJob) -> CachePlan:
    """Validate everything that can be checked without the teacher's weights."""
    hf_config, tokenizer, vocab_size, store = prepare_tokens(job)
    width = slot_width(job.cache.mode, job.cache.top_k, job.cache.samples, vocab_size)
    teacher = teacher_identity(job.teacher.model, job.teacher.revision, hf_config, local_dir=job.cache.local_dir,
                               gguf_file=job.teacher.gguf_file)
    data = data_identity(job.data, store.documents, store.sha256)
    # Every part of a cache resolves ``auto`` alike on alike nodes; a part on other hardware gets another fingerprint.
    teacher_dtype = compute_dtype(job.teacher.dtype, resolve_device(job.device))
    identity = _fingerprint_identity(job, teacher, tokenizer_sha256(tokenizer), data, width, teacher_dtype)
    c = job.cache
    head = c.top_k if c.mode != "sample" else 0
    layout = Layout(c.format_version, c.mode, vocab_size, head, width - head, c.samples if c.mode != "topk" else 0,
                    c.logprob_bits, c.text_alignment)
    header = _header(job, hf_config, tokenizer, layout, teacher, data, identity)
    directory = join(job.cache.dir) if job.cache.dir else join(job.cache.root, header.fingerprint)
    sequences = {name: len(s.input_ids) for name, s in store.splits.items()}
    shards = plan_shards(sequences, job.cache.shard_size, get_backend(job.cache.format).suffix)
    return CachePlan(job, tokenizer, store.splits, vocab_size, width, header, layout, teacher_dtype, directory, shards)
