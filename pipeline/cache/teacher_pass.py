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
from pipeline.cache.reduce import hybrid_targets, sample_targets, sequence_uniforms, topk_targets
from pipeline.errors import TeacherError
from pipeline.hf import LogitHead, check_logit_head, hidden_states, input_device, load_model
from pipeline.log import progress_bars
from storage.formats import get_format
from storage.shard_writer import BackgroundShardWriter
from storage.writer import ShardPlan

SPLIT_IDS = {"train": 0, "eval": 1}


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
    model = load_model(t.model, device, t.dtype, t.revision, t.trust_remote_code, placement=_placement(t, device),
                       local_dir=plan.job.cache.local_dir)
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
    """The five fields of one shard, computed batch by batch; stops at a preemption request."""
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
    for name, index in (("topk_ids", 0), ("topk_logprobs", 1), ("tail_logprob", 2)):
        arrays[name] = np.concatenate([p[index] for p in parts])
    return arrays


def write_shards(plan: CachePlan, todo: list[ShardPlan], device: torch.device, part: int, model,
                 writer: bool = True) -> PassTimes:
    """Compute the shards of ``todo`` with an already loaded teacher ``model``; write them when ``writer`` (the
    other ranks of a tensor-parallel part compute the same shards with it, and drop them)."""
    c = plan.job.cache
    head = LogitHead.of(model)
    # One thread cannot keep up with a GPU teacher; on a CPU teacher a second would take a core from it.
    threads = 1 if device.type == "cpu" else min(4, os.cpu_count() or 1)
    shard_writer = BackgroundShardWriter(plan.cache, get_format(c.format), c.compression_level, depth=threads + 1,
                                   threads=threads)
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
