"""Score a student against a live teacher on a cache's held-out split.

Every student, whatever it was trained on, is measured the same way: exact
KL(teacher || student) over the whole vocabulary, perplexity on the hard
labels, top-1 agreement with the teacher and expected calibration error.
Positions with ``loss_mask = 0`` (padding, prompts) are left out.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from pipeline.evaluate import CalibrationBins
from pipeline.losses import cross_entropy, dense_forward_kl
from pipeline.step import labels_and_masks
from pipeline.teacher import LogitHead, hidden_states
from storage.manifest import read_manifest
from storage.reader import sequential_batches


@torch.no_grad()
def score_against_teacher(student_dir: Path, teacher_dir: Path, cache_dir: Path, batch_size: int = 8,
                          max_batches: int | None = None) -> dict:
    """Token-averaged ``kl``, ``ppl``, ``top1`` and ``ece`` of the student on the cache's eval split."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(str(student_dir)).eval()
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    real_vocab = read_manifest(cache_dir).data["tokenizer"]["length"]
    s_head, t_head = LogitHead.of(student), LogitHead.of(teacher)
    kl = ce = agree = 0.0
    kd_tokens = ce_tokens = 0
    calibration = CalibrationBins()
    for index, batch in enumerate(sequential_batches(cache_dir, "eval", batch_size)):
        if max_batches is not None and index >= max_batches:
            break
        labels, kd_mask, ce_mask = (t.reshape(-1) for t in labels_and_masks(batch))
        s_logits = s_head(hidden_states(student, batch["input_ids"]).reshape(labels.shape[0], -1))[:, :real_vocab]
        t_logits = t_head(hidden_states(teacher, batch["input_ids"]).reshape(labels.shape[0], -1))[:, :real_vocab]
        kl += (dense_forward_kl(s_logits, t_logits) * kd_mask).sum().item()
        agree += ((s_logits.argmax(-1) == t_logits.argmax(-1)) & kd_mask).sum().item()
        kd_tokens += int(kd_mask.sum())
        ce += (cross_entropy(s_logits, labels) * ce_mask).sum().item()
        ce_tokens += int(ce_mask.sum())
        calibration.add(s_logits, labels, ce_mask)
    return {"kl": kl / kd_tokens, "ppl": math.exp(ce / ce_tokens), "top1": agree / kd_tokens,
            "ece": calibration.ece()}


