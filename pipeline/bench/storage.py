"""Storage benchmark: bytes/token, write and read speed per backend, format version and setting, and
fidelity per byte.

Every setting (``pipeline.bench.storage_settings``) stores the same teacher's targets; each is written as
shards through the storage writer and read back through the reader, in interleaved repeats.

Fidelity is the angle between the gradient of the cached KD loss and that of
full-vocabulary forward KL, on a held-out batch, for a partly trained
student, computed from the shard as training reads it back (so 8-bit
log-probs show their effect). It is reported twice: for the student's logits,
all positions concatenated, where per-position sampling noise adds up; and
for the student's parameters, the gradient an optimizer step actually uses,
where that noise averages out over positions while the bias of top-k does not.
"""
from __future__ import annotations

import math
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.bench.remote_read import cpu_model
from pipeline.bench.storage_settings import setting_layout, setting_targets, target_key
from pipeline.models.head import LogitHead, hidden_states
from pipeline.train.losses import dense_kd, kd_loss
from storage import (
    CacheDirectory,
    Layout,
    Manifest,
    ShardPlan,
    fingerprint,
    get_backend,
    read_manifest,
    sequential_batches,
)


def cached_gradient(student_logits: torch.Tensor, ids, logprobs, tail) -> torch.Tensor:
    """d(cached forward KL with tail bucket)/d(student logits), (N, V) float32."""
    s = student_logits.clone().requires_grad_(True)
    labels = torch.full((s.shape[0],), -100)
    (sparse,) = torch.autograd.grad(kd_loss(s, ids, logprobs, tail, labels).sum(), s)
    return sparse


def angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    cosine = torch.nn.functional.cosine_similarity(a.reshape(1, -1).double(), b.reshape(1, -1).double()).item()
    return math.degrees(math.acos(max(-1.0, min(1.0, cosine))))


def bench_manifest(layout: Layout, backend, level: int) -> Manifest:
    """The manifest header of a cache of ``layout`` in ``backend``: what ``Layout.of`` reads back."""
    v3, sampled = layout.version == 3, layout.mode == "sample"
    return Manifest(format_version=layout.version, vocab_size=layout.vocab_size, mode=layout.mode,
                    top_k=None if sampled else layout.head_width, samples=layout.samples or None,
                    width=layout.head_width + layout.sample_width, format=backend.name,
                    compression={"codec": "zstd", "level": level}, dtypes=layout.columns(),
                    logprob_bits=layout.logprob_bits if v3 and not sampled else None)


def _write_cache(directory: Path, backend, layout: Layout, targets: dict, copies: int, level: int) -> float:
    """Write ``copies`` shards of ``targets`` through the storage writer; return the seconds spent on shards.

    The timing covers what stage 1's writer thread does per shard: ``layout.encode`` (validation, sorting,
    delta coding, byte planes, 8-bit quantisation), compression, the atomic write and the sha256. Done
    records and the manifest (a fixed cost per shard, about 0.3 ms for the fsync of a record here) are
    written after it.
    """
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    cache = CacheDirectory(directory, fingerprint({"storage_benchmark": str(directory)}))
    plans = [ShardPlan("train", index, 0, len(targets["input_ids"]), backend.suffix) for index in range(copies)]
    start = time.perf_counter()
    records = [cache.encode_shard(plan, backend, layout.encode(targets), level) for plan in plans]
    seconds = time.perf_counter() - start
    for plan, record in zip(plans, records):
        cache.mark_done(plan, record)
    cache.assemble(plans, bench_manifest(layout, backend, level), lambda folder: folder.mkdir())
    return seconds


def _read_seconds(directory: Path) -> float:
    """Seconds to read every shard through the full reader path: checksums, decoding, torch tensors."""
    start = time.perf_counter()
    for _batch in sequential_batches(directory, "train", 64, verify=True):
        pass
    return time.perf_counter() - start


def model_logits(model_dir: Path, input_ids: np.ndarray, keep_graph: bool = False):
    """Load a causal LM in fp32; return it and its (N, V) float32 logits on (B, T) ``input_ids``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.set_grad_enabled(keep_graph):
        hidden = hidden_states(model, torch.from_numpy(input_ids).long())
        return model, LogitHead.of(model)(hidden.reshape(-1, hidden.shape[-1]))


class StudentGradients:
    """A student's logits on fixed ids, and the parameter gradient that a logit gradient induces."""

    def __init__(self, model_dir: Path, input_ids: np.ndarray):
        model, self._logits = model_logits(model_dir, input_ids, keep_graph=True)
        self._parameters = [p for p in model.parameters() if p.requires_grad]
        self.logits = self._logits.detach()

    def parameter_gradient(self, logit_gradient: torch.Tensor) -> torch.Tensor:
        """(N, V) d loss / d logits -> the flattened d loss / d parameters (vector-Jacobian product)."""
        grads = torch.autograd.grad(self._logits, self._parameters, grad_outputs=logit_gradient, retain_graph=True,
                                    allow_unused=True)
        return torch.cat([g.reshape(-1) for g in grads if g is not None])


def storage_records(teacher_logits: torch.Tensor, student: StudentGradients, input_ids: np.ndarray,
                    settings: list[dict], scratch: Path, copies: int = 8, repeats: int = 3) -> list[dict]:
    """One record per setting (``pipeline.bench.storage_settings``): sizes, write and read speed (medians over
    interleaved repeats, with min-max spreads) and gradient angles."""
    layouts = [setting_layout(s, teacher_logits.shape[-1]) for s in settings]
    targets: dict[tuple, dict] = {}
    for s, layout in zip(settings, layouts):
        if target_key(s) not in targets:
            targets[target_key(s)] = setting_targets(teacher_logits, s, layout, input_ids)
    timings = [{"write": [], "read": []} for _ in settings]
    for _ in range(repeats):  # interleave the settings so machine noise hits them alike
        for i, (s, layout) in enumerate(zip(settings, layouts)):
            directory = scratch / f"setting-{i}"
            timings[i]["write"].append(_write_cache(directory, get_backend(s["format"]), layout,
                                                    targets[target_key(s)], copies, s["level"]))
            timings[i]["read"].append(_read_seconds(directory))
    full = full_gradients(student, teacher_logits)
    records = [_record(s, scratch / f"setting-{i}", timings[i], student, full, len(input_ids))
               for i, s in enumerate(settings)]
    shutil.rmtree(scratch, ignore_errors=True)
    return records


def full_gradients(student: StudentGradients, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of full-vocabulary forward KL for the student's logits and for its parameters."""
    s = student.logits.clone().requires_grad_(True)
    (full,) = torch.autograd.grad(dense_kd(s, teacher_logits).sum(), s)
    return full, student.parameter_gradient(full)


def gradient_angles(student: StudentGradients, full: tuple[torch.Tensor, torch.Tensor], batch: dict) -> dict:
    """Angles between the cached loss's gradients on a reader ``batch`` of the positions and ``full``'s."""
    width = batch["topk_ids"].shape[-1]
    cached = cached_gradient(student.logits, batch["topk_ids"].reshape(-1, width),
                             batch["topk_logprobs"].reshape(-1, width), batch["tail_logprob"].reshape(-1))
    return {"grad_angle_deg": angle_degrees(cached, full[0]),
            "param_angle_deg": angle_degrees(student.parameter_gradient(cached), full[1])}


def _record(s: dict, directory: Path, timing: dict, student: StudentGradients,
            full: tuple[torch.Tensor, torch.Tensor], sequences: int) -> dict:
    manifest = read_manifest(directory)
    tokens, size = manifest.tokens, manifest.bytes
    batch = next(sequential_batches(directory, "train", sequences))  # shard 0, as training reads it
    used = float((batch["topk_ids"] >= 0).sum(-1).float().mean())
    write, read = timing["write"], timing["read"]
    return {**s, "bytes_per_token": size / tokens, "mean_ids": used, "bytes_per_entry": size / tokens / max(used, 1e-9),
            "write_mb_per_s": size / 1e6 / statistics.median(write),
            "write_tok_per_s": tokens / statistics.median(write),
            "write_spread": [tokens / max(write), tokens / min(write)],
            "read_tok_per_s": tokens / statistics.median(read), "read_spread": [tokens / max(read), tokens / min(read)],
            **gradient_angles(student, full, batch), "cpu": cpu_model(), "repeats": len(write)}
