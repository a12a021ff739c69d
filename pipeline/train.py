"""Stage 2, ``distillery train`` (and ``pretrain``): the student training loop, written out in full.

One optimizer step: fetch ``grad_accum`` micro-batches, count their valid
tokens (summed over ranks), run forward and backward on each with the loss
normalised by those counts, all-reduce gradients across ranks, clip, step
AdamW and the warmup + cosine schedule. Evaluation, metrics and checkpoints
happen between steps; the final student is saved with ``save_pretrained``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline import preempt
from pipeline.cache_dir import ensure_writable
from pipeline.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
from pipeline.config import TeacherConfig
from pipeline.evaluate import evaluate
from pipeline.sources import BatchSource
from pipeline.step import LossFacts, combine, micro_batch_sums, token_counts
from pipeline.student import build_student
from pipeline.teacher import LogitHead, load_model, resolve_device
from pipeline.train_config import Phase, StudentConfig, TrainConfig
from storage.atomic import atomic_write, write_text
from storage.stream import StreamState


def log(message: str) -> None:
    print(f"[distillery train] {message}", file=sys.stderr, flush=True)


def lr_at(step: int, phases: list[Phase], warmup: int, min_ratio: float) -> float:
    """Linear warmup then cosine decay to ``min_ratio * lr``, restarted in each phase."""
    for phase in phases:
        if step < phase.steps:
            if step < warmup:
                return phase.lr * (step + 1) / warmup
            progress = (step - warmup) / max(phase.steps - warmup, 1)
            return phase.lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        step -= phase.steps
    return phases[-1].lr * min_ratio


def phase_at(step: int, phases: list[Phase]) -> tuple[int, Phase]:
    for index, phase in enumerate(phases):
        if step < phase.steps:
            return index, phase
        step -= phase.steps
    return len(phases) - 1, phases[-1]


class MetricsLog:
    """``metrics.jsonl``: one JSON record per line; on resume, records after the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


def _world() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _preemption_agreed(world: int) -> bool:
    """True when any rank got a preemption signal, so that all ranks stop after the same step."""
    flag = torch.tensor([1.0 if preempt.requested() else 0.0])
    if world > 1:
        dist.all_reduce(flag)
    return bool(flag.item())


def _all_reduce_gradients(model, world: int) -> None:
    if world == 1:
        return
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= world


def run_training(source: BatchSource, student_cfg: StudentConfig, train: TrainConfig, phases: list[Phase],
                 device_name: str, config_yaml: str) -> Path:
    """Train (or resume) and return ``<out_dir>/final``."""
    rank, world = _world()
    out = Path(train.out_dir)
    final = out / "final"
    if rank == 0:
        ensure_writable(out, "train.out_dir")
        write_text(out / "config.yaml", config_yaml)
    device = resolve_device(device_name, int(os.environ.get("LOCAL_RANK", 0)))
    model = build_student(student_cfg, source.vocab_size, source.tokenizer).to(device).train()
    head = LogitHead.of(model)
    facts = LossFacts(real_vocab=source.real_vocab, cache_temperature=source.temperature)
    total = sum(p.steps for p in phases)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=train.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, phases, train.warmup_steps, train.min_lr_ratio))
    step, tokens, start = 0, 0, StreamState()
    found = checkpoint_dirs(out / "checkpoints") if train.resume == "auto" else []
    if found:
        state = load_checkpoint(found[-1], model, optimizer, scheduler, device)
        step, tokens, start = state["step"], state["tokens"], StreamState(**state["stream"])
        log(f"resumed from {found[-1]} at step {step}")
    if step >= total and final.is_dir():
        log(f"{final} is complete; nothing to do")
        return final
    metrics = MetricsLog(out / "metrics.jsonl", step, rank == 0)
    teachers = {p.loss.teacher_live for p in phases if p.loss.teacher_live}
    live = {path: load_model(TeacherConfig(model=path), device) for path in teachers}
    stream = source.stream(start)
    consumed = 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    progress = tqdm(total=total, initial=step, desc="train", unit="step", file=sys.stderr, disable=rank != 0)
    # The first fetch opens, verifies and decodes a shard before prefetching can start: a fixed start-up
    # cost, logged apart from the steady-state fraction of step time spent waiting for data.
    startup_wait = None
    waited = busy = 0.0
    while step < total:
        phase_index, phase = phase_at(step, phases)
        began = time.perf_counter()
        micro = [{k: v.to(device, non_blocking=True) for k, v in next(stream).items()} for _ in range(train.grad_accum)]
        fetched = time.perf_counter()
        consumed += len(micro)
        counts = sum(token_counts(b) for b in micro)
        if world > 1:
            dist.all_reduce(counts)
        kd_tokens, ce_tokens = counts.tolist()
        step_loss = 0.0
        for batch in micro:
            with autocast:
                kd_sum, ce_sum = micro_batch_sums(model, head, batch, phase.loss, facts, train.chunk_size,
                                                  live.get(phase.loss.teacher_live))
            loss = combine(kd_sum, ce_sum, kd_tokens, ce_tokens, phase.loss) * world
            loss.backward()
            step_loss += loss.item() / world
        _all_reduce_gradients(model, world)
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += sum(b["input_ids"].numel() for b in micro) * world
        if startup_wait is None:
            startup_wait = fetched - began
        else:
            waited, busy = waited + fetched - began, busy + time.perf_counter() - began
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens / max(progress.format_dict['elapsed'], 1e-9):.0f}")
        if step % train.log_every == 0 or step == total:
            metrics.write({"type": "train", "step": step, "phase": phase_index, "loss": step_loss,
                           "lr": lr, "tokens": tokens, "data_wait": waited / max(busy, 1e-9),
                           "startup_wait_s": startup_wait})
        if source.eval_batches and rank == 0 and ((train.eval_every and step % train.eval_every == 0) or step == total):
            result = evaluate(model, head, source.eval_batches(), facts, device, train.chunk_size, train.eval_batches)
            metrics.write({"type": "eval", "step": step, "phase": phase_index, **result})
        stream_state = start.advance(consumed, source.batches_per_epoch)
        stop = _preemption_agreed(world)
        due = train.checkpoint_every and (step % train.checkpoint_every == 0 or step == total)
        if rank == 0 and (due or stop):
            save_checkpoint(out / "checkpoints", model, optimizer, scheduler,
                            {"step": step, "tokens": tokens, "stream": stream_state.__dict__}, train.keep_checkpoints)
        if stop:
            progress.close()
            raise preempt.Preempted(f"checkpointed at step {step} in {out / 'checkpoints'}; rerun to resume")
    progress.close()
    if rank == 0:
        with atomic_write(final) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
            source.tokenizer.save_pretrained(str(tmp))
        log(f"saved the student to {final}")
    if world > 1:
        dist.barrier()
    return final
