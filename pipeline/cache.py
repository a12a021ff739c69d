"""Stage 1, ``distillery cache``: run the teacher once and write its soft targets to shards.

The flow: load the teacher's config and tokenizer, pack the data, compute the
fingerprint, and return at once on a cache hit. Otherwise load the weights
and, for each shard this process owns, run the decoder over batches, apply
the lm_head and the reduction in chunks of positions on the device, and hand
the reduced (n, T, W) arrays to a background writer. The last process to
finish assembles the manifest.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import __version__, preempt
from pipeline.cache_dir import assemble_manifest, claim, ensure_writable, is_complete, missing_shards
from pipeline.config import CacheJob
from pipeline.config_loading import to_dict, to_yaml
from pipeline.data import PackedSplit, data_identity, prepare_splits
from pipeline.errors import ConfigError, DataError, TeacherError
from pipeline.identity import teacher_identity, tokenizer_sha256
from pipeline.reduce import hybrid_targets, sample_targets, sequence_uniforms, slot_width, topk_targets
from pipeline.shard_writer import BackgroundShardWriter, ShardPlan, discard_shard, plan_shards, read_done_record
from pipeline.teacher import (
    LogitHead,
    check_logit_head,
    hidden_states,
    load_config_and_tokenizer,
    load_model,
    max_positions,
    resolve_device,
)
from storage.formats import get_format
from storage.manifest import FORMAT_VERSION, fingerprint
from storage.partition import num_parts, part_index, shards_of_part
from storage.schema import FIELDS, NARROW_PAD

SPLIT_IDS = {"train": 0, "eval": 1}


def log(message: str) -> None:
    print(f"[distillery cache] {message}", file=sys.stderr, flush=True)


@dataclass
class CacheResult:
    directory: Path
    hit: bool
    shards_written: int


@dataclass
class CachePlan:
    """Everything decided before the teacher's weights are loaded."""

    job: CacheJob
    tokenizer: object
    splits: dict[str, PackedSplit]
    vocab_size: int
    width: int
    header: dict
    directory: Path
    shards: list[ShardPlan]

    @property
    def fingerprint(self) -> str:
        return self.header["fingerprint"]


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


def _fingerprint_identity(job: CacheJob, teacher: dict, tokenizer_hash: str, data: dict, width: int) -> dict:
    c = job.cache
    return {
        "format_version": FORMAT_VERSION,
        "teacher": {k: teacher[k] for k in ("weights_sha256",)} if teacher["weights_sha256"] else teacher,
        "teacher_dtype": job.teacher.dtype,
        "tokenizer_sha256": tokenizer_hash,
        "data_sha256": data["sha256"],
        "seq_len": job.data.seq_len,
        "mode": c.mode,
        "width": width,
        "top_k": c.top_k if c.mode != "sample" else None,
        "samples": c.samples if c.mode != "topk" else None,
        "seed": c.seed if c.mode != "topk" else None,
        "temperature": c.temperature,
        "format": c.format,
        "shard_size": c.shard_size,
    }


def make_plan(job: CacheJob) -> CachePlan:
    """Validate everything that can be checked without the teacher's weights."""
    if job.cache.dir:
        ensure_writable(Path(job.cache.dir), "cache.dir")
    else:
        ensure_writable(Path(job.cache.root), "cache.root")
    hf_config, tokenizer = load_config_and_tokenizer(job.teacher)
    vocab_size = _check_against_model(job, hf_config)
    splits = prepare_splits(job.data, tokenizer)
    top_id = max(int(s.input_ids.max()) for s in splits.values())
    if top_id >= vocab_size:
        raise DataError(f"token id {top_id} from the tokenizer is outside the teacher's vocab ({vocab_size})")
    width = slot_width(job.cache.mode, job.cache.top_k, job.cache.samples, vocab_size)
    teacher = teacher_identity(job.teacher.model, job.teacher.revision, hf_config)
    data = data_identity(job.data, splits)
    tokenizer_hash = tokenizer_sha256(tokenizer)
    identity = _fingerprint_identity(job, teacher, tokenizer_hash, data, width)
    fp = fingerprint(identity)
    directory = Path(job.cache.dir) if job.cache.dir else Path(job.cache.root) / fp
    fmt = get_format(job.cache.format)
    header = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fp,
        "created_by": f"distillery {__version__}",
        "teacher": {**teacher, "dtype": job.teacher.dtype, "model_type": getattr(hf_config, "model_type", None)},
        "tokenizer": {"sha256": tokenizer_hash, "length": len(tokenizer),
                      "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        "vocab_size": vocab_size,
        "dataset": data,
        "seq_len": job.data.seq_len,
        "mode": job.cache.mode,
        "top_k": job.cache.top_k if job.cache.mode != "sample" else None,
        "samples": job.cache.samples if job.cache.mode != "topk" else None,
        "seed": job.cache.seed,
        "width": width,
        "temperature": job.cache.temperature,
        "format": fmt.name,
        "compression": {"codec": "zstd", "level": job.cache.compression_level},
        "dtypes": {field.name: str(field.dtype) for field in FIELDS},
        "id_storage": f"uint16 per shard and field when every id < {NARROW_PAD} (padding -1 as {NARROW_PAD}), else int32",
        "fingerprint_identity": identity,
        "config": to_dict(job),
    }
    sequences = {name: len(s.input_ids) for name, s in splits.items()}
    shards = plan_shards(sequences, job.cache.shard_size, fmt.suffix)
    return CachePlan(job, tokenizer, splits, vocab_size, width, header, directory, shards)


def batch_targets(model, head: LogitHead, plan: CachePlan, split: str, first: int, input_ids: torch.Tensor):
    """Soft targets for (B, T) int64 ids: ids (B, T, W) int32, logprobs float16, tail (B, T) float32, on CPU."""
    c = plan.job.cache
    batch, seq_len = input_ids.shape
    flat = hidden_states(model, input_ids).reshape(batch * seq_len, -1)
    out_ids = torch.empty((batch * seq_len, plan.width), dtype=torch.int32, device=flat.device)
    out_logprobs = torch.empty((batch * seq_len, plan.width), dtype=torch.float16, device=flat.device)
    out_tail = torch.empty(batch * seq_len, dtype=torch.float32, device=flat.device)
    if c.mode != "topk":
        uniforms = torch.cat([
            sequence_uniforms(c.seed, SPLIT_IDS[split], first + b, seq_len, c.samples) for b in range(batch)
        ]).to(flat.device)
    for lo in range(0, flat.shape[0], c.chunk_size):
        hi = min(lo + c.chunk_size, flat.shape[0])
        logits = head(flat[lo:hi])
        if c.mode == "topk":
            ids, logprobs, tail = topk_targets(logits, c.top_k, c.temperature)
        elif c.mode == "hybrid":
            ids, logprobs, tail = hybrid_targets(logits, c.top_k, uniforms[lo:hi], c.temperature)
            ids, logprobs = ids[:, : plan.width], logprobs[:, : plan.width]
        else:
            ids, logprobs, tail = sample_targets(logits, uniforms[lo:hi], c.temperature, plan.width)
        out_ids[lo:hi], out_logprobs[lo:hi], out_tail[lo:hi] = ids, logprobs, tail
    shape = (batch, seq_len)
    return (out_ids.reshape(*shape, -1).cpu().numpy(), out_logprobs.reshape(*shape, -1).cpu().numpy(),
            out_tail.reshape(shape).cpu().numpy())


@dataclass
class PassTimes:
    """Where the wall time of a teacher pass went, in seconds."""

    teacher: float = 0.0
    """Teacher forward, reduction and copy of the targets to the host."""
    writer_wait: float = 0.0
    """Blocked handing a shard to the writer, whose queue was full."""
    final_flush: float = 0.0
    """Waiting for the last shards to reach disk after the teacher finished."""


def _write_shards(plan: CachePlan, todo: list[ShardPlan], device: torch.device, rank: int, model=None) -> PassTimes:
    """Write the shards of ``todo``, loading the teacher unless an already loaded ``model`` is given."""
    c = plan.job.cache
    model = model if model is not None else load_model(plan.job.teacher, device)
    head = LogitHead.of(model)
    if head.vocab_size != plan.vocab_size:
        raise TeacherError(f"the teacher's lm_head has {head.vocab_size} rows but its config says vocab_size={plan.vocab_size}")
    first = plan.splits[todo[0].split].input_ids[todo[0].start : todo[0].start + 1]
    with torch.inference_mode():
        check_logit_head(model, head, torch.from_numpy(first).long().to(device))
    # One thread cannot keep up with a GPU teacher; on a CPU teacher a second would take a core from it.
    threads = 1 if device.type == "cpu" else min(4, os.cpu_count() or 1)
    writer = BackgroundShardWriter(plan.directory, get_format(c.format), c.compression_level, plan.fingerprint,
                                   depth=threads + 1, threads=threads)
    total = sum(s.count for s in todo) * plan.job.data.seq_len
    progress = tqdm(total=total, unit="tok", unit_scale=True, desc=f"teacher pass (part {rank})", file=sys.stderr)
    times = PassTimes()
    try:
        for shard in todo:
            split = plan.splits[shard.split]
            arrays = {
                "input_ids": split.input_ids[shard.start : shard.start + shard.count],
                "loss_mask": split.loss_mask[shard.start : shard.start + shard.count],
            }
            parts = []
            for lo in range(shard.start, shard.start + shard.count, c.batch_size):
                if preempt.requested():  # the shard in flight is dropped; written shards are flushed below
                    raise preempt.Preempted(f"stopped before shard {shard.name}; rerun the command to resume")
                hi = min(lo + c.batch_size, shard.start + shard.count)
                began = time.perf_counter()
                ids = torch.from_numpy(split.input_ids[lo:hi]).long().to(device)
                with torch.inference_mode():
                    parts.append(batch_targets(model, head, plan, shard.split, lo, ids))
                times.teacher += time.perf_counter() - began
                progress.update(ids.numel())
            for name, index in (("topk_ids", 0), ("topk_logprobs", 1), ("tail_logprob", 2)):
                arrays[name] = np.concatenate([p[index] for p in parts])
            began = time.perf_counter()
            writer.submit(shard, arrays)
            times.writer_wait += time.perf_counter() - began
    finally:
        progress.close()
        began = time.perf_counter()
        writer.close()
        times.final_flush = time.perf_counter() - began
    return times


def run_cache(job: CacheJob, num_tasks: int = 1, task_index: int = 0, finalize_only: bool = False) -> CacheResult:
    """Run (or resume) this process's part of the cache; assemble the manifest when all parts are done."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    plan = make_plan(job)
    directory = plan.directory
    if is_complete(directory, plan.fingerprint):
        log(f"cache hit: {directory} already holds fingerprint {plan.fingerprint}; no teacher work needed")
        return CacheResult(directory, True, 0)
    ensure_writable(directory, "cache directory")
    claim(directory, plan.fingerprint, to_yaml(job))
    written = 0
    if not finalize_only:
        parts = num_parts(num_tasks, world_size)
        part = part_index(task_index, num_tasks, rank, world_size)
        mine = [plan.shards[i] for i in shards_of_part(len(plan.shards), part, parts)]
        todo = [s for s in mine if read_done_record(directory, s, plan.fingerprint) is None]
        for shard in todo:
            discard_shard(directory, shard)
        log(f"part {part}/{parts}: {len(mine)} shards, {len(mine) - len(todo)} already complete, {len(todo)} to write")
        if todo:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            times = _write_shards(plan, todo, resolve_device(job.device, local_rank), part)
            log(f"part {part}: teacher {times.teacher:.1f} s, blocked on the shard writer {times.writer_wait:.1f} s, "
                f"final flush {times.final_flush:.1f} s")
        written = len(todo)
    missing = missing_shards(directory, plan.shards)
    if missing:
        if finalize_only:
            raise FileNotFoundError(f"cannot finalize {directory}: {len(missing)} shards are missing: {missing[:10]}")
        log(f"{len(missing)} shards are still being written by other parts; the last part to finish writes the manifest")
        return CacheResult(directory, False, written)
    assemble_manifest(directory, plan.shards, plan.header, plan.tokenizer)
    log(f"wrote manifest for {len(plan.shards)} shards in {directory}")
    return CacheResult(directory, False, written)
