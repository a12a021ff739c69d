"""Held-out metrics, computed one way for both uses: against cached targets, or against a live teacher.

``kl`` is KL(teacher || student) per token, ``ce`` / ``ppl`` the loss on the
hard next token, ``top1`` the agreement of the student's argmax with the
teacher's, ``ece`` the expected calibration error of the student's top-1
against the hard next token (15 equal-width bins). ``bpb`` is the hard
next-token loss in bits per byte of the text (a document end counts one
byte): unlike ppl, it compares students of different tokenizers. It needs a
cache with text alignment; ``kl`` and ``top1`` need the teacher's tokenizer. Positions with
``loss_mask = 0`` (padding, prompts) are left out. A metric with no tokens to
average over is ``None``, never a division by zero.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline.dist import World, all_reduce_sum
from pipeline.models.gguf import gguf_arguments
from pipeline.models.head import LogitHead, hidden_states
from pipeline.train.losses import cross_entropy, dense_kd, kd_loss
from pipeline.train.step import LossFacts, labels_and_masks
from storage import Cache, open_cache, sequential_batches

ECE_BINS = 15


class CalibrationBins:
    """Expected calibration error of the top-1 prediction, accumulated chunk by chunk in equal-width bins."""

    def __init__(self):
        self.sums = torch.zeros(3, ECE_BINS, dtype=torch.float64)  # count, confidence sum, correct sum

    def add(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Bin (N, V) logits against (N,) labels where ``mask``; return the (N,) top-1 predictions."""
        confidence, predicted = torch.softmax(logits.float(), -1).max(-1)
        which = (confidence.double() * ECE_BINS).long().clamp(max=ECE_BINS - 1)[mask].cpu()
        for row, values in enumerate((torch.ones_like(confidence), confidence, (predicted == labels).float())):
            self.sums[row].index_add_(0, which, values.double()[mask].cpu())
        return predicted

    def ece(self) -> float | None:
        count = self.sums[0].sum()
        return None if count == 0 else ((self.sums[1] - self.sums[2]).abs().sum() / count).item()


class HeldOutMetrics:
    """Token sums of every metric; ``result`` turns them into averages."""

    def __init__(self):
        self.ce = self.kl = self.bytes = 0.0
        self.ce_tokens = self.kd_tokens = self.agree = 0
        self.calibration = CalibrationBins()

    def add(self, logits: torch.Tensor, labels: torch.Tensor, ce_mask: torch.Tensor, kd_mask: torch.Tensor,
            kl: torch.Tensor | None = None, teacher_top1: torch.Tensor | None = None,
            target_bytes: torch.Tensor | None = None) -> None:
        """One chunk: (N, V) student logits, (N,) labels and masks, per-token ``kl``, teacher argmax ids and the
        bytes of each next token."""
        self.ce += (cross_entropy(logits, labels) * ce_mask).sum().item()
        if target_bytes is not None:
            self.bytes += (target_bytes * ce_mask).sum().item()
        self.ce_tokens += int(ce_mask.sum())
        predicted = self.calibration.add(logits, labels, ce_mask)
        if kl is not None:
            self.kl += (kl * kd_mask).sum().item()
            self.agree += int(((predicted == teacher_top1) & kd_mask).sum())
            self.kd_tokens += int(kd_mask.sum())

    def all_reduce(self, here: World) -> None:
        """Sum every token sum over the ranks (a collective)."""
        scalars = torch.tensor([self.ce, self.kl, self.bytes, self.ce_tokens, self.kd_tokens, self.agree],
                               dtype=torch.float64)
        packed = all_reduce_sum(torch.cat([scalars, self.calibration.sums.reshape(-1)]), here)
        self.ce, self.kl, self.bytes = packed[0].item(), packed[1].item(), packed[2].item()
        self.ce_tokens, self.kd_tokens, self.agree = (int(v) for v in packed[3:6].tolist())
        self.calibration.sums = packed[6:].reshape(self.calibration.sums.shape)

    def result(self) -> dict:
        ce = self.ce / self.ce_tokens if self.ce_tokens else None
        return {"ce": ce, "ppl": math.exp(min(ce, 50.0)) if ce is not None else None,
                "ece": self.calibration.ece(), "tokens": self.ce_tokens,
                "bpb": self.ce / self.bytes / math.log(2) if self.bytes else None,
                "kl": self.kl / self.kd_tokens if self.kd_tokens else None,
                "top1": self.agree / self.kd_tokens if self.kd_tokens else None}


def _score_batch(model, head: LogitHead, batch: dict[str, torch.Tensor], facts: LossFacts, chunk_size: int,
                 metrics: HeldOutMetrics | None) -> None:
    """Add one batch's chunks to ``metrics``; with ``None``, run only the decoder (an FSDP rank without a batch
    must still join its collectives)."""
    labels, kd_mask, ce_mask = (t.reshape(-1) for t in labels_and_masks(batch))
    flat = hidden_states(model, batch["input_ids"]).reshape(labels.shape[0], -1)
    if metrics is None:
        return
    cached = "topk_ids" in batch and "teacher_position" not in batch  # KL needs the teacher's vocabulary
    target_bytes = batch["target_bytes"].reshape(-1) if "target_bytes" in batch else None
    if cached:
        width = batch["topk_ids"].shape[-1]
        ids, logprobs = batch["topk_ids"].reshape(-1, width), batch["topk_logprobs"].reshape(-1, width)
        tails = batch["tail_logprob"].reshape(-1)
    for lo in range(0, flat.shape[0], chunk_size):
        hi = min(lo + chunk_size, flat.shape[0])
        logits = head(flat[lo:hi])[:, : facts.real_vocab]
        kl = top1 = None
        if cached:
            t = facts.cache_temperature
            kl = kd_loss(logits, ids[lo:hi], logprobs[lo:hi], tails[lo:hi], labels[lo:hi], temperature=t,
                         cache_temperature=t, real_vocab=facts.real_vocab) / t**2
            top1 = ids[lo:hi, 0]
        metrics.add(logits, labels[lo:hi], ce_mask[lo:hi], kd_mask[lo:hi], kl, top1,
                    target_bytes[lo:hi] if target_bytes is not None else None)


@torch.no_grad()
def evaluate(engine, head: LogitHead, batches: Iterator[dict[str, torch.Tensor]], facts: LossFacts,
             device: torch.device, chunk_size: int, max_batches: int | None, here: World) -> dict:
    """Metrics against the cached targets of the held-out batches, shared out over the ranks.

    ``engine`` is the training module (``StudentForward``, maybe under DDP or
    FSDP2). Batches go round-robin to the ranks, and the token sums are added
    over ranks, so the result does not depend on the world size.

    ``kl`` is forward KL with the tail bucket at the cache temperature (the
    T² loss scale undone). On a sample-mode cache it is the plug-in estimate
    over the drawn ids; score with a top-k ``cache.eval_dir`` for exact
    comparisons. ``top1`` compares with the teacher's most probable stored id.
    """
    was_training = engine.training
    engine.eval()
    metrics = HeldOutMetrics()
    held_out = itertools.islice(batches, max_batches)
    while batches_of_round := list(itertools.islice(held_out, here.size)):
        mine = here.rank < len(batches_of_round)
        batch = {k: v.to(device) for k, v in batches_of_round[here.rank if mine else 0].items()}
        engine(_score_batch, head, batch, facts, chunk_size, metrics if mine else None)
    metrics.all_reduce(here)
    engine.train(was_training)
    return metrics.result()


def _teacher_pass(teacher, cache: Cache, batch_size: int, max_batches: int | None) -> Iterator[tuple[dict, torch.Tensor]]:
    """Each held-out batch of ``cache`` with the teacher's (N, real vocab) logits at its positions."""
    real_vocab, head = cache.manifest.tokenizer_length, LogitHead.of(teacher)
    for batch in itertools.islice(sequential_batches(cache, "eval", batch_size), max_batches):
        flat = hidden_states(teacher, batch["input_ids"]).reshape(batch["input_ids"].numel(), -1)
        yield batch, head(flat)[:, :real_vocab]


def _score(student, pairs: Iterator[tuple[dict, torch.Tensor]], real_vocab: int) -> dict:
    """Metrics of ``student`` against (batch, teacher logits) pairs."""
    head, metrics = LogitHead.of(student), HeldOutMetrics()
    for batch, t_logits in pairs:
        labels, kd_mask, ce_mask = (t.reshape(-1) for t in labels_and_masks(batch))
        s_logits = head(hidden_states(student, batch["input_ids"]).reshape(labels.shape[0], -1))[:, :real_vocab]
        metrics.add(s_logits, labels, ce_mask, kd_mask, dense_kd(s_logits, t_logits), t_logits.argmax(-1))
    return metrics.result()


def _load(model_dir: Path | str, gguf_file: str | None = None):
    """A saved model in fp32, dequantised from its file ``gguf_file`` in ``model_dir`` when given."""
    from transformers import AutoModelForCausalLM

    found = gguf_arguments(str(model_dir), gguf_file) if gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(str(model_dir), **found).eval()


@torch.no_grad()
def score_against_teacher(student_dir: Path, teacher_dir: Path, cache_dir: str | Path, batch_size: int = 8,
                          max_batches: int | None = None, local_dir: str | Path | None = None,
                          teacher_gguf: str | None = None) -> dict:
    """Metrics of a saved student against a live teacher (read from its file ``teacher_gguf`` in ``teacher_dir``
    when given), on a cache's eval split (``cache_dir`` may be a URL, read through copies under ``local_dir``).

    Every student, whatever it was trained on, is measured the same way:
    ``kl`` over the whole vocabulary, ``top1`` against the teacher's argmax.
    """
    cache = open_cache(cache_dir, local_dir)
    pairs = _teacher_pass(_load(teacher_dir, teacher_gguf), cache, batch_size, max_batches)
    return _score(_load(student_dir), pairs, cache.manifest.tokenizer_length)


class TeacherReference:
    """``score_against_teacher`` for many students: the teacher's held-out logits are computed once and kept
    in memory (eval tokens x vocabulary x 4 bytes: cap the eval split, e.g. with ``data.eval_max_tokens``)."""

    @torch.no_grad()
    def __init__(self, teacher_dir: Path, cache_dir: str | Path, batch_size: int = 8, max_batches: int | None = None):
        cache = open_cache(cache_dir)
        self.real_vocab = cache.manifest.tokenizer_length
        self.pairs = list(_teacher_pass(_load(teacher_dir), cache, batch_size, max_batches))

    @property
    def tokens(self) -> int:
        return sum(int(batch["loss_mask"].sum()) for batch, _ in self.pairs)

    @torch.no_grad()
    def score(self, student) -> dict:
        """Metrics of ``student`` (a model, or the folder of a saved one)."""
        model = student if isinstance(student, torch.nn.Module) else _load(student)
        return _score(model.eval(), iter(self.pairs), self.real_vocab)
