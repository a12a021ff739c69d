"""Stage 2's training recipe: one class whose ``setup`` and ``train`` write the student loop out in full.

One optimizer step fetches ``grad_accum`` micro-batches, counts their valid
tokens summed over ranks, runs forward and backward on each with the loss
normalised by those global counts (gradients are reduced over ranks by DDP or
FSDP2 on the last micro-batch only), clips, and steps AdamW and the warmup +
cosine schedule. Evaluation, metrics and checkpoints happen between steps; the
final student is saved with ``save_pretrained``.

``train.out_dir`` may be a URL (``s3://bucket/prefix``, any fsspec protocol): the job then works in a local
copy under ``cache.local_dir`` and uploads each piece once it is complete: ``config.yaml`` and
``metrics.jsonl``, then each checkpoint with its ``state.json`` last, and at the end ``final/`` with its
``config.json`` last, so that a destination holding ``final/config.json`` holds the whole student. A job that
finds a checkpoint only the destination has (a requeue on another node) downloads it and resumes. The
``out_dir`` lock stays local, so nothing stops two jobs on two nodes training into one URL: let the scheduler
run one job per ``out_dir`` at a time.
"""
from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline import preempt
from pipeline.dist import all_reduce_sum, any_rank, barrier, init_process_group, world
from pipeline.log import get_logger, progress_bars
from pipeline.models.device import compute_dtype, dtype_choice, resolve_device
from pipeline.models.head import LogitHead
from pipeline.models.hf import load_model
from pipeline.train.checkpoint import CHECKPOINTS, publish_checkpoint, restore_rng, save_checkpoint
from pipeline.train.config import LiveTeacherConfig, Phase, StudentConfig, TrainConfig
from pipeline.train.evaluate import evaluate
from pipeline.train.lora import ADAPTER_LAST, attach_lora, save_student, saves_adapter
from pipeline.train.metrics import METRICS_NAME, DataWait, MetricsLog, chain_samples
from pipeline.train.online import OnlineBatches
from pipeline.train.parallel import full_state_dict, gradient_scale, gradient_sync, resolve_strategy, wrap
from pipeline.train.resume import result_settings, resume_checkpoint
from pipeline.train.schedule import lr_at, phase_at
from pipeline.train.sources import BatchSource
from pipeline.train.step import LossFacts, combine, micro_batch_sums, token_counts
from pipeline.train.student import build_student
from pipeline.train.trackers import TRACKERS_NAME, RoundGroup, Trackers, require_trackers
from storage import (
    CONFIG_NAME,
    DirectoryInUseError,
    DirectoryLock,
    Mirror,
    StreamOrder,
    StreamState,
    atomic_write,
    ensure_writable,
    join,
    remove_stale_temporaries,
    write_text,
)

log = get_logger("train")
FINAL, FINAL_LAST = "final", "config.json"
"""``final/`` is uploaded with ``config.json`` last (a folder without one does not load as a model anyway); a LoRA
adapter folder (``student.lora.merge: false``) with ``adapter_config.json`` last."""


def final_exists(out: Mirror) -> bool:
    """Whether ``out``'s destination holds a whole ``final/``: a killed upload lacks its last file."""
    return any(out.exists(f"{FINAL}/{last}") for last in (FINAL_LAST, ADAPTER_LAST))


class TrainingRecipe:
    """Train (or resume) a student on a ``BatchSource`` and save it to ``<out_dir>/final``."""

    def __init__(self, source: BatchSource, order: StreamOrder, student: StudentConfig, train: TrainConfig,
                 phases: list[Phase], device: str, config_yaml: str, live_teacher: LiveTeacherConfig | None = None,
                 local_dir: str | None = None, online: OnlineBatches | None = None, group: RoundGroup | None = None):
        self.source, self.order, self.student_cfg, self.cfg, self.phases = source, order, student, train, phases
        self.online = online  # the student's own samples replace the cache's training sequences
        self.group = group  # the distillery run round this job trains, whose tracker group its runs join
        self.device_name, self.config_yaml, self.local_dir = device, config_yaml, local_dir
        self.live_cfg = live_teacher or LiveTeacherConfig()
        self.mirror = Mirror(train.out_dir, local_dir)
        self.out = self.mirror.local
        self.final = self.out / FINAL
        self.result = join(train.out_dir, FINAL)  # where the student ends up: ``final`` itself, or its URL
        self.lock = DirectoryLock(self.out)
        self.total = sum(p.steps for p in phases)
        self.metrics: Trackers | None = None  # metrics.jsonl and train.report_to's trackers, opened by setup

    def setup(self) -> None:
        """Process group, output directory, model, engine, optimizer, schedule, resume state, live teachers, data."""
        require_trackers(self.cfg.report_to)  # a missing tracker package stops the job before any model loads
        self.world = world()
        self.strategy = resolve_strategy(self.cfg.strategy, self.world)
        self.device = resolve_device(self.device_name, self.world.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        init_process_group(self.world, single_process_group=self.strategy != "single")
        self.precision = compute_dtype(self.cfg.precision, self.device, allow_fp16=False)
        self._lock_out_dir()
        self.model = build_student(self.student_cfg, self.source.vocab_size, self.source.tokenizer, self.local_dir)
        self.adapter = attach_lora(self.model, self.student_cfg.lora, self.strategy, self.student_cfg.seed)
        self.model = self.model.to(self.device).train()
        self.engine = wrap(self.model, self.strategy, self.device, self.world)
        self.head = LogitHead.of(self.model)
        alignment = self.source.alignment
        self.facts = LossFacts(real_vocab=self.source.real_vocab, cache_temperature=self.source.temperature,
                               teacher_vocab=self.source.teacher_vocab,
                               id_map=alignment.id_map.to(self.device) if alignment else None)
        trainable = [p for p in self.engine.parameters() if p.requires_grad]  # a LoRA student's adapters alone
        self.optimizer = torch.optim.AdamW(trainable, lr=1.0, weight_decay=self.cfg.weight_decay, betas=(0.9, 0.95))
        # The optimizer's lr is 1, so the schedule's value is the learning rate itself.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_at(s, self.phases, self.cfg.warmup_steps, self.cfg.min_lr_ratio))
        self.step, self.tokens, self.samples_sha256 = 0, 0, ""
        found = None
        if self.cfg.resume == "auto":
            found = resume_checkpoint(self.mirror, self.order, result_settings(self.config_yaml),
                                      self.model, self.optimizer, self.scheduler, self.world)
        if found:
            state = found.state
            self.step, self.tokens, self.samples_sha256 = state["step"], state["tokens"], state["samples_sha256"]
            log.info(f"resumed from {found.path} at step {self.step} ({state['world_size']} -> {self.world.size} ranks)")
            if state.get("precision", self.precision) != self.precision:  # a requeue onto other hardware
                log.warning(f"the checkpoint was trained in {state['precision']}; this node continues in {self.precision}")
        if self.world.is_main:  # only now: a refused job must not leave its config beside another run's checkpoints
            write_text(self.out / CONFIG_NAME, self.config_yaml)
        log.info(f"student computes in {dtype_choice(self.cfg.precision, self.precision, self.device)}")
        if self.complete:
            return
        self.metrics = Trackers.open(MetricsLog(self.out / METRICS_NAME, self.step, self.world.is_main),
                                     self.cfg.report_to, self.mirror, self.config_yaml, self.step, self.world.is_main,
                                     self.group)
        paths = {p.loss.teacher_live for p in self.phases if p.loss.teacher_live}
        c = self.live_cfg
        self.live = {path: load_model(path, self.device, c.dtype, c.revision, c.trust_remote_code,
                                      key="loss.teacher_live", local_dir=self.local_dir) for path in paths}
        state = StreamState(self.step * self.order.global_batch)
        self.stream = self.online.stream(self.model, state) if self.online else self.source.stream(state)
        if found:
            restore_rng(found)
        self.wait = DataWait()

    def _lock_out_dir(self) -> None:
        """Rank 0 locks ``out_dir`` for the job's lifetime; every rank stops if another job holds it."""
        held_elsewhere = None
        if self.world.is_main:
            ensure_writable(self.out, "train.out_dir")
            try:
                self.lock.acquire("train.out_dir")
                for directory in (self.out, self.out / CHECKPOINTS):  # left by a killed job; this one owns them
                    remove_stale_temporaries(directory)
            except DirectoryInUseError as exc:
                held_elsewhere = exc
        if any_rank(held_elsewhere is not None, self.world):
            raise held_elsewhere or DirectoryInUseError(f"train.out_dir {self.out} is in use by another job")

    def close(self) -> None:
        """End the tracker runs and release ``out_dir`` (the kernel does it anyway when the process ends)."""
        if self.metrics:
            self.metrics.close(complete=self.complete)
        self.lock.release()

    @property
    def complete(self) -> bool:
        return self.step >= self.total and final_exists(self.mirror)

    def train_step(self, phase: Phase) -> tuple[float, float, int]:
        """One optimizer step; returns (global mean loss, learning rate used, tokens of all ranks)."""
        began = time.perf_counter()
        device = self.device
        micro = [next(self.stream) for _ in range(self.cfg.grad_accum)]
        samples = [batch.pop("sample_index") for batch in micro]
        micro = [{k: v.to(device, non_blocking=True) for k, v in batch.items()} for batch in micro]
        fetched = time.perf_counter()
        self.samples_sha256 = chain_samples(self.samples_sha256, samples, self.world)
        counts = all_reduce_sum(sum(token_counts(b) for b in micro), self.world)
        kd_tokens, ce_tokens = counts.tolist()
        autocast = nullcontext()
        if self.precision == "bf16" and self.strategy != "fsdp":  # FSDP2's mixed-precision policy casts instead
            autocast = torch.autocast(device.type, dtype=torch.bfloat16)
        scale = gradient_scale(self.strategy, self.world)
        local_loss = 0.0
        for index, batch in enumerate(micro):
            with gradient_sync(self.engine, self.strategy, sync=index == len(micro) - 1):
                with autocast:
                    kd_sum, ce_sum = self.engine(micro_batch_sums, self.head, batch, phase.loss, self.facts,
                                                 self.cfg.chunk_size, self.live.get(phase.loss.teacher_live))
                # Normalised by the token counts of every micro-batch on every rank, so this is the rank's share
                # of the global mean loss: the sum of the shares' gradients over ranks is the mean's gradient.
                loss = combine(kd_sum, ce_sum, kd_tokens, ce_tokens, phase.loss)
                (loss * scale).backward()
            local_loss += loss.item()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.engine.parameters(), self.cfg.grad_clip)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.wait.add(began, fetched, time.perf_counter())
        # One collective for both figures: the global mean loss is the sum of the ranks' shares.
        totals = torch.tensor([local_loss, sum(b["input_ids"].numel() for b in micro)], dtype=torch.float64)
        loss, step_tokens = all_reduce_sum(totals, self.world).tolist()
        return loss, lr, int(step_tokens)

    def evaluate(self, phase_index: int) -> None:
        """Held-out metrics over every rank's share of the eval batches, summed over ranks, into ``metrics.jsonl``."""
        if self.source.eval_batches is None:
            return
        result = evaluate(self.engine, self.head, self.source.eval_batches(), self.facts, self.device,
                          self.cfg.chunk_size, self.cfg.eval_batches, self.world)
        self.metrics.write({"type": "eval", "step": self.step, "phase": phase_index, **result})

    def save_checkpoint(self) -> None:
        """Model, optimizer, schedule, RNG and the global samples consumed (every rank writes its shards)."""
        o = self.order
        state = {"step": self.step, "tokens": self.tokens, "samples": self.step * o.global_batch,
                 "samples_sha256": self.samples_sha256, "strategy": self.strategy, "world_size": o.world_size,
                 "global_batch": o.global_batch, "batch_size": o.batch_size, "grad_accum": o.grad_accum,
                 "precision": self.precision, "settings": result_settings(self.config_yaml)}
        path = save_checkpoint(self.out / CHECKPOINTS, self.model, self.optimizer, self.scheduler, state,
                               self.cfg.keep_checkpoints, self.world)
        if self.world.is_main:
            self._push_records()
            publish_checkpoint(self.mirror, path)
        barrier(self.world)

    def _push_records(self) -> None:
        """Upload ``config.yaml``, ``metrics.jsonl`` and ``trackers.json`` before what they go with: the
        destination's records then always reach its newest checkpoint, and a resume drops those after it."""
        for name in (CONFIG_NAME, METRICS_NAME, TRACKERS_NAME):
            if (self.out / name).is_file():
                self.mirror.push(name)

    def save_final(self) -> None:
        """The student as a plain ``save_pretrained`` folder (or a LoRA adapter folder) with its tokenizer, the
        cache's unless ``student.tokenizer`` names another (gathered on rank 0)."""
        weights = full_state_dict(self.model, self.strategy)
        if self.world.is_main:
            self.mirror.remove(FINAL)  # an older student (before train.steps grew) must not look complete meanwhile
            with atomic_write(self.final) as tmp:
                save_student(self.model, self.adapter, self.student_cfg.lora, weights, tmp)
                self.source.tokenizer.save_pretrained(str(tmp))
            self._push_records()
            self.mirror.push(FINAL, last=(ADAPTER_LAST if saves_adapter(self.student_cfg.lora) else FINAL_LAST,))
            log.info(f"saved the student to {self.result}")
        barrier(self.world)

    def train(self) -> Path | str:
        """Run the remaining steps with evaluation, metrics, checkpoints and preemption; return where ``final``
        is (a URL for a URL ``out_dir``)."""
        if self.complete:
            log.info(f"{self.result} is complete; nothing to do")
            return self.result
        cfg = self.cfg
        progress = tqdm(total=self.total, initial=self.step, desc="train", unit="step", file=sys.stderr,
                        disable=not (self.world.is_main and progress_bars()))
        began = time.perf_counter()
        while self.step < self.total:
            phase_index, phase = phase_at(self.step, self.phases)
            loss, lr, step_tokens = self.train_step(phase)
            self.step, self.tokens = self.step + 1, self.tokens + step_tokens
            last = self.step == self.total
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{self.tokens / max(progress.format_dict['elapsed'], 1e-9):.0f}")
            if self.step % cfg.log_every == 0 or last:
                self.metrics.write({"type": "train", "step": self.step, "phase": phase_index, "loss": loss, "lr": lr,
                                    "tokens": self.tokens, "elapsed_s": time.perf_counter() - began,
                                    "samples_sha256": self.samples_sha256,
                                    "data_wait": self.wait.fraction, "startup_wait_s": self.wait.startup})
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or last:
                self.evaluate(phase_index)
            stop = any_rank(preempt.requested(), self.world)  # every rank stops after the same step
            if (cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or last)) or stop:
                self.save_checkpoint()
            if stop:
                progress.close()
                raise preempt.Preempted(f"checkpointed at step {self.step} in {self.mirror.where(CHECKPOINTS)}; "
                                        "rerun to resume")
        progress.close()
        self.save_final()
        return self.result
