"""Held-out metrics: KL(teacher || student) on the stored support, CE / perplexity, top-1 agreement, ECE."""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from pipeline.losses import cross_entropy, kd_loss
from pipeline.step import LossFacts, labels_and_masks
from pipeline.teacher import LogitHead, hidden_states

ECE_BINS = 15


class CalibrationBins:
    """Expected calibration error of the top-1 prediction, accumulated chunk by chunk in equal-width bins."""

    def __init__(self):
        self.sums = torch.zeros(3, ECE_BINS, dtype=torch.float64)  # count, confidence sum, correct sum

    def add(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Bin (N, V) logits against (N,) labels where ``mask``; return the (N,) top-1 predictions."""
        confidence, predicted = torch.softmax(logits, -1).max(-1)
        which = (confidence.double() * ECE_BINS).long().clamp(max=ECE_BINS - 1)[mask].cpu()
        for row, values in enumerate((torch.ones_like(confidence), confidence, (predicted == labels).float())):
            self.sums[row].index_add_(0, which, values.double()[mask].cpu())
        return predicted

    def ece(self) -> float:
        return ((self.sums[1] - self.sums[2]).abs().sum() / self.sums[0].sum().clamp(min=1)).item()


@torch.no_grad()
def evaluate(model, head: LogitHead, batches: Iterator[dict[str, torch.Tensor]], facts: LossFacts,
             device: torch.device, chunk_size: int, max_batches: int | None = None) -> dict[str, float]:
    """Token-averaged metrics over the held-out batches.

    ``kl`` is forward KL with the tail bucket at the cache temperature. On a
    sample-mode cache it is the plug-in estimate over the drawn ids; score
    with a top-k ``cache.eval_dir`` for exact comparisons.
    ``ece`` bins the student's top-1 confidence against the hard next token.
    """
    was_training = model.training
    model.eval()
    totals = {"kl": 0.0, "kd_tokens": 0, "top1": 0.0, "ce": 0.0, "ce_tokens": 0}
    calibration = CalibrationBins()
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        labels, kd_mask, ce_mask = (t.reshape(-1) for t in labels_and_masks(batch))
        flat = hidden_states(model, batch["input_ids"]).reshape(labels.shape[0], -1)
        for lo in range(0, flat.shape[0], chunk_size):
            hi = min(lo + chunk_size, flat.shape[0])
            logits = head(flat[lo:hi])[:, : facts.real_vocab]
            ce_m = ce_mask[lo:hi]
            totals["ce"] += (cross_entropy(logits, labels[lo:hi]) * ce_m).sum().item()
            totals["ce_tokens"] += int(ce_m.sum())
            predicted = calibration.add(logits, labels[lo:hi], ce_m)
            if "topk_ids" in batch:
                width = batch["topk_ids"].shape[-1]
                ids = batch["topk_ids"].reshape(-1, width)[lo:hi]
                kl = kd_loss(logits, ids, batch["topk_logprobs"].reshape(-1, width)[lo:hi],
                             batch["tail_logprob"].reshape(-1)[lo:hi], labels[lo:hi],
                             temperature=facts.cache_temperature, cache_temperature=facts.cache_temperature,
                             real_vocab=facts.real_vocab)
                kd_m = kd_mask[lo:hi]
                totals["kl"] += (kl * kd_m).sum().item() / facts.cache_temperature**2  # undo the T^2 loss scale
                totals["top1"] += ((predicted == ids[:, 0]) & kd_m).sum().item()
                totals["kd_tokens"] += int(kd_m.sum())
    model.train(was_training)
    ce = totals["ce"] / max(totals["ce_tokens"], 1)
    result = {"ce": ce, "ppl": math.exp(min(ce, 50.0)), "ece": calibration.ece(), "tokens": totals["ce_tokens"]}
    if totals["kd_tokens"]:
        result.update(kl=totals["kl"] / totals["kd_tokens"], top1=totals["top1"] / totals["kd_tokens"])
    else:
        result.update(kl=None, top1=None)
    return result
