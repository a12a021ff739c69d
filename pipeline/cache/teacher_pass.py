"""Stage 1's teacher pass: run the decoder over batches, reduce chunked logits on the device, hand shards to the writer."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from pipeline import preempt
from pipeline.cache.config import TeacherConfig
from pipeline.cache.plan import CachePlan
from pipeline.cache.reduce import hybrid_draws, sample_draws, sequence_uniforms, topk_targets
from pipeline.errors import TeacherError
from pipeline.log import get_logger, progress_bars
from pipeline.models.device import dtype_choice
from pipeline.models.head import LogitHead, check_logit_head, hidden_states
from pipeline.models.hf import input_device, load_model
from storage import BackgroundShardWriter, ShardPlan, get_backend

SPLIT_IDS = {"train": 0, "eval": 1}
HEAD_FIELDS = ("head_ids", "head_logprobs", "tail_logprob")
SAMPLE_FIELDS = ("sample_ids", "sample_counts")
log = get_logger("cache")
TARGET_DTYPES = {"head_ids": torch.int32, "head_logprobs": torch.float32, "tail_logprob": torch.float32,
                 "sample_ids": torch.int32, "sample_counts": torch.int32}


def _chunk_targets(plan: CachePlan, logits: torch.Tensor, uniforms: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The targets (``storage.codec.targets``) of one chunk of (n, V) logits."""
    c, layout = plan.job.cache, plan.layout
    if c.mode == "topk":
        return dict(zip(HEAD_FIELDS, topk_targets(logits, c.top_k, c.temperature)))
    if c.mode == "hybrid":
        parts = hybrid_draws(logits, c.top_k, uniforms, c.temperature, layout.sample_width)
        return dict(zip(HEAD_FIELDS + SAMPLE_FIELDS, parts))
    return dict(zip(SAMPLE_FIELDS, sample_draws(logits, uniforms, c.temperature, layout.sample_width)))


def batch_targets(model, head: LogitHead, plan: CachePlan, split: str, first: int,
                  input_ids: torch.Tensor) -> dict[str, np.ndarray]:
    """Soft targets of (B, T) int64 ids, on the host: the mode's ``storage.codec.targets`` target fields (head_ids
    (B, T, K) int32, head_logprobs float32, tail_logprob (B, T) float32; sample_ids (B, T, S) int32,
    sample_counts int32)."""
    c, layout = plan.job.cache, plan.layout
    batch, seq_len = input_ids.shape
    flat = hidden_states(model, input_ids).reshape(batch * seq_len, -1)
    widths = {"head_ids": layout.head_width, "head_logprobs": layout.head_width, "tail_logprob": None,
              "sample_ids": layout.sample_width, "sample_counts": layout.sample_width}
    uniforms = None
    if c.mode != "topk":
        uniforms = torch.cat([
            sequence_uniforms(c.seed, SPLIT_IDS[split], first + b, seq_len, c.samples, c.sampler)
            for b in range(batch)
        ]).to(flat.device)
    out: dict[str, torch.Tensor] = {}
    for lo in range(0, flat.shape[0], c.chunk_size):
        hi = min(lo + c.chunk_size, flat.shape[0])
        for name, value in _chunk_targets(plan, head(flat[lo:hi]), uniforms[lo:hi] if uniforms is not None else None).items():
            if name not in out:
                shape = (flat.shape[0],) if widths[name] is None else (flat.shape[0], widths[name])
                out[name] = torch.empty(shape, dtype=TARGET_DTYPES[name], device=flat.device)
            out[name][lo:hi] = value
    return {name: v.reshape(batch, seq_len, *v.shape[1:]).cpu().numpy() for name, v in out.items()}


@dataclass
class PassTimes:
    """Where the wall time of a teacher pass went, in seconds."""

    teacher: float = 0.0
    """Teacher forward, reduction and copy of the targets to the host."""
    writer_wait: float = 0.0
    """Blocked handing a shard to the writer, whose queue was full."""
    final_flush: float = 0.0
    """Waiting for the last shards to reach disk after the teacher finished."""


def _placement(teacher: TeacherConfig, device: torch.device) -> dict | None:
    """``from_pretrained`` arguments that place the weights: tensor parallel, or a device map over this part's
    GPUs (the ``gpus_per_part`` from ``device`` on, each filled to 90 % to leave room for activations)."""
    if teacher.parallel == "tensor":
        from transformers import DistributedConfig

        return {"distributed_config": DistributedConfig(tp_plan="auto")}
    if teacher.device_map is None:
        return None
    if device.type != "cuda":
        return {"device_map": teacher.device_map}
    gpus = range(device.index, device.index + teacher.gpus_per_part)
    if gpus.stop > torch.cuda.device_count():
        raise TeacherError(f"teacher.gpus_per_part {teacher.gpus_per_part} from GPU {device.index} needs GPUs up to "
                           f"{gpus.stop - 1}, but {torch.cuda.device_count()} are visible; lower it or use fewer ranks")
    return {"device_map": teacher.device_map,
            "max_memory": {g: int(0.9 * torch.cuda.get_device_properties(g).total_memory) for g in gpus}}


def load_teacher(plan: CachePlan, device: torch.device):
    """The teacher in its configured dtype and placement, with its logit head checked against its own forward."""
    t = plan.job.teacher
    began = time.perf_counter()
    model = load_model(t.model, device, plan.teacher_dtype, t.revision, t.trust_remote_code, placement=_placement(t, device),
                       local_dir=plan.job.cache.local_dir, gguf_file=t.gguf_file)
    # A GGUF teacher is dequantised as it loads: tens of seconds where a safetensors folder takes a few.
    log.info(f"teacher loaded in {time.perf_counter() - began:.1f} s, computing in "
             f"{dtype_choice(t.dtype, plan.teacher_dtype, device)}"
             + (f" (dequantised from {t.gguf_file})" if t.gguf_file else ""))
    head = LogitHead.of(model)
    if head.vocab_size != plan.vocab_size:
        raise TeacherError(f"the teacher's lm_head has {head.vocab_size} rows but its config says "
                           f"vocab_size={plan.vocab_size}")
    first = plan.splits[plan.shards[0].split].input_ids[:1]
    with torch.inference_mode():
        check_logit_head(model, head, torch.from_numpy(first.astype(np.int64)).to(input_device(model)))
    return model


def _shard_arrays(model, head: LogitHead, plan: CachePlan, shard: ShardPlan, progress,
                  times: PassTimes) -> dict[str, np.ndarray]:
    """The targets (``storage.codec.targets``) of one shard, computed batch by batch; stops at a preemption request."""
    split = plan.splits[shard.split]
    device = input_device(model)
    rows = slice(shard.start, shard.start + shard.count)
    parts = []
    for lo in range(shard.start, shard.start + shard.count, plan.job.cache.batch_size):
        if preempt.requested():  # the shard in flight is dropped; written shards are flushed by the caller
            raise preempt.Preempted(f"stopped before shard {shard.name}; rerun the command to resume")
        hi = min(lo + plan.job.cache.batch_size, shard.start + shard.count)
        began = time.perf_counter()
        ids = torch.from_numpy(split.input_ids[lo:hi].astype(np.int64)).to(device)  # a copy: the rows are a read-only map
        with torch.inference_mode():
            parts.append(batch_targets(model, head, plan, shard.split, lo, ids))
        times.teacher += time.perf_counter() - began
        progress.update(ids.numel())
    arrays = {"input_ids": split.input_ids[rows], "loss_mask": split.loss_mask[rows]}
    if plan.layout.token_roles:
        arrays["token_role"] = split.token_role[rows]
    return arrays | {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def write_shards(plan: CachePlan, todo: list[ShardPlan], device: torch.device, part: int, model,
                 writer: bool = True) -> PassTimes:
    """Compute the shards of ``todo`` with an already loaded teacher ``model``; write them when ``writer`` (the
    other ranks of a tensor-parallel part compute the same shards with it, and drop them)."""
    c = plan.job.cache
    head = LogitHead.of(model)
    # One thread cannot keep up with a GPU teacher; on a CPU teacher a second would take a core from it.
    threads = 1 if device.type == "cpu" else min(4, os.cpu_count() or 1)
    shard_writer = BackgroundShardWriter(plan.cache, get_backend(c.format), plan.layout, c.compression_level,
                                         depth=threads + 1, threads=threads)
    total = sum(s.count for s in todo) * plan.job.data.seq_len
    progress = tqdm(total=total, unit="tok", unit_scale=True, desc=f"teacher pass (part {part})", file=sys.stderr,
                    disable=not progress_bars())
    times = PassTimes()
    try:
        for shard in todo:
            arrays = _shard_arrays(model, head, plan, shard, progress, times)
            began = time.perf_counter()
            if writer:
                shard_writer.submit(shard, arrays)
            times.writer_wait += time.perf_counter() - began
    finally:
        progress.close()
        began = time.perf_counter()
        shard_writer.close()
        times.final_flush = time.perf_counter() - began
    return times
