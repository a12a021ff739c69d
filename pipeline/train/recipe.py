"""Stage 2's training recipe: one class whose ``setup`` and ``train`` write the student loop out in full.

One optimizer step fetches ``grad_accum`` micro-batches, counts their valid
tokens summed over ranks, runs forward and backward on each with the loss
normalised by those global counts, sums gradients across ranks, clips, and
steps AdamW and the warmup + cosine schedule. Evaluation, metrics and
checkpoints happen between steps; the final student is saved with
``save_pretrained``.
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline import preempt
from pipeline.dist import all_reduce_sum, any_rank, barrier, init_process_group, world
from pipeline.hf import LogitHead, load_model, resolve_device
from pipeline.log import get_logger
from pipeline.train.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
from pipeline.train.config import LiveTeacherConfig, Phase, StudentConfig, TrainConfig
from pipeline.train.evaluate import evaluate
from pipeline.train.schedule import lr_at, phase_at
from pipeline.train.sources import BatchSource
from pipeline.train.step import LossFacts, combine, micro_batch_sums, token_counts
from pipeline.train.student import build_student
from storage.atomic import atomic_write, ensure_writable, write_text
from storage.stream import StreamState

log = get_logger("train")


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


class DataWait:
    """Time spent waiting for batches, apart from the first fetch (which opens, verifies and decodes a shard
    before prefetching can start: a fixed start-up cost, not a steady-state one)."""

    def __init__(self):
        self.startup: float | None = None
        self.waited = self.busy = 0.0

    def add(self, began: float, fetched: float, ended: float) -> None:
        if self.startup is None:
            self.startup = fetched - began
        else:
            self.waited, self.busy = self.waited + fetched - began, self.busy + ended - began

    @property
    def fraction(self) -> float:
        return self.waited / max(self.busy, 1e-9)


class TrainingRecipe:
    """Train (or resume) a student on a ``BatchSource`` and save it to ``<out_dir>/final``."""

    def __init__(self, source: BatchSource, student: StudentConfig, train: TrainConfig, phases: list[Phase],
                 device: str, config_yaml: str, live_teacher: LiveTeacherConfig | None = None):
        self.source, self.student_cfg, self.cfg, self.phases = source, student, train, phases
        self.device_name, self.config_yaml = device, config_yaml
        self.live_cfg = live_teacher or LiveTeacherConfig()
        self.out = Path(train.out_dir)
        self.final = self.out / "final"
        self.total = sum(p.steps for p in phases)

    def setup(self) -> None:
        """Process group, output directory, model, optimizer, schedule, resume state, live teachers, data."""
        self.world = world()
        init_process_group(self.world)
        if self.world.is_main:
            ensure_writable(self.out, "train.out_dir")
            write_text(self.out / "config.yaml", self.config_yaml)
        self.device = resolve_device(self.device_name, self.world.local_rank)
        self.model = build_student(self.student_cfg, self.source.vocab_size, self.source.tokenizer)
        self.model = self.model.to(self.device).train()
        self.head = LogitHead.of(self.model)
        self.facts = LossFacts(real_vocab=self.source.real_vocab, cache_temperature=self.source.temperature)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1.0, weight_decay=self.cfg.weight_decay,
                                           betas=(0.9, 0.95))
        # The optimizer's lr is 1, so the schedule's value is the learning rate itself.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_at(s, self.phases, self.cfg.warmup_steps, self.cfg.min_lr_ratio))
        self.step, self.tokens, self.start = 0, 0, StreamState()
        found = checkpoint_dirs(self.out / "checkpoints") if self.cfg.resume == "auto" else []
        if found:
            state = load_checkpoint(found[-1], self.model, self.optimizer, self.scheduler, self.device)
            self.step, self.tokens, self.start = state["step"], state["tokens"], StreamState(**state["stream"])
            log.info(f"resumed from {found[-1]} at step {self.step}")
        if self.complete:
            return
        self.metrics = MetricsLog(self.out / "metrics.jsonl", self.step, self.world.is_main)
        paths = {p.loss.teacher_live for p in self.phases if p.loss.teacher_live}
        c = self.live_cfg
        self.live = {path: load_model(path, self.device, c.dtype, c.revision, c.trust_remote_code,
                                      key="loss.teacher_live") for path in paths}
        self.stream = self.source.stream(self.start)
        self.consumed = 0
        self.wait = DataWait()

    @property
    def complete(self) -> bool:
        return self.step >= self.total and self.final.is_dir()

    def train_step(self, phase: Phase) -> tuple[float, float, int]:
        """One optimizer step; returns (global mean loss, learning rate used, tokens of all ranks)."""
        began = time.perf_counter()
        device = self.device
        micro = [{k: v.to(device, non_blocking=True) for k, v in next(self.stream).items()}
                 for _ in range(self.cfg.grad_accum)]
        fetched = time.perf_counter()
        self.consumed += len(micro)
        counts = all_reduce_sum(sum(token_counts(b) for b in micro), self.world)
        kd_tokens, ce_tokens = counts.tolist()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        local_loss = 0.0
        for batch in micro:
            with autocast:
                kd_sum, ce_sum = micro_batch_sums(self.model, self.head, batch, phase.loss, self.facts,
                                                  self.cfg.chunk_size, self.live.get(phase.loss.teacher_live))
            # Normalised by the token counts of every micro-batch on every rank, so this is the rank's share
            # of the global mean loss: summing the shares' gradients over ranks gives the mean's gradient.
            loss = combine(kd_sum, ce_sum, kd_tokens, ce_tokens, phase.loss)
            loss.backward()
            local_loss += loss.item()
        self._sum_gradients_over_ranks()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.wait.add(began, fetched, time.perf_counter())
        # One collective for both figures: the global mean loss is the sum of the ranks' shares.
        totals = torch.tensor([local_loss, sum(b["input_ids"].numel() for b in micro)], dtype=torch.float64)
        loss, step_tokens = all_reduce_sum(totals, self.world).tolist()
        return loss, lr, int(step_tokens)

    def _sum_gradients_over_ranks(self) -> None:
        if self.world.size == 1:
            return
        for param in self.model.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)

    def evaluate(self, phase_index: int) -> None:
        """Held-out metrics on rank 0, into ``metrics.jsonl``."""
        if self.source.eval_batches is None or not self.world.is_main:
            return
        result = evaluate(self.model, self.head, self.source.eval_batches(), self.facts, self.device,
                          self.cfg.chunk_size, self.cfg.eval_batches)
        self.metrics.write({"type": "eval", "step": self.step, "phase": phase_index, **result})

    def save_checkpoint(self) -> None:
        """Model, optimizer, schedule, RNG and the stream position after the batches consumed so far."""
        if not self.world.is_main:
            return
        stream = self.start.advance(self.consumed, self.source.batches_per_epoch)
        save_checkpoint(self.out / "checkpoints", self.model, self.optimizer, self.scheduler,
                        {"step": self.step, "tokens": self.tokens, "stream": stream.__dict__},
                        self.cfg.keep_checkpoints)

    def save_final(self) -> None:
        """The student as a plain ``save_pretrained`` folder with the cache's tokenizer."""
        if self.world.is_main:
            with atomic_write(self.final) as tmp:
                self.model.save_pretrained(str(tmp), safe_serialization=True)
                self.source.tokenizer.save_pretrained(str(tmp))
            log.info(f"saved the student to {self.final}")
        barrier(self.world)

    def train(self) -> Path:
        """Run the remaining steps with evaluation, metrics, checkpoints and preemption; return ``final``."""
        if self.complete:
            log.info(f"{self.final} is complete; nothing to do")
            return self.final
        cfg = self.cfg
        progress = tqdm(total=self.total, initial=self.step, desc="train", unit="step", file=sys.stderr,
                        disable=not self.world.is_main)
        while self.step < self.total:
            phase_index, phase = phase_at(self.step, self.phases)
            loss, lr, step_tokens = self.train_step(phase)
            self.step, self.tokens = self.step + 1, self.tokens + step_tokens
            last = self.step == self.total
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{self.tokens / max(progress.format_dict['elapsed'], 1e-9):.0f}")
            if self.step % cfg.log_every == 0 or last:
                self.metrics.write({"type": "train", "step": self.step, "phase": phase_index, "loss": loss, "lr": lr,
                                    "tokens": self.tokens, "data_wait": self.wait.fraction,
                                    "startup_wait_s": self.wait.startup})
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or last:
                self.evaluate(phase_index)
            stop = any_rank(preempt.requested(), self.world)  # every rank stops after the same step
            if (cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or last)) or stop:
                self.save_checkpoint()
            if stop:
                progress.close()
                raise preempt.Preempted(f"checkpointed at step {self.step} in {self.out / 'checkpoints'}; "
                                        "rerun to resume")
        progress.close()
        self.save_final()
        return self.final
