"""Storage benchmark: bytes/token, write and read speed per backend and setting, and fidelity per byte.

Fidelity is the angle between the gradient of the cached KD loss and that of
full-vocabulary forward KL, on a held-out batch, for a partly trained
student. It is reported twice: for the student's logits, all positions
concatenated, where per-position sampling noise adds up; and for the
student's parameters, the gradient an optimizer step actually uses, where
that noise averages out over positions while the bias of top-k does not.
"""
from __future__ import annotations

import math
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.cache.reduce import hybrid_targets, sample_targets, sequence_uniforms, topk_targets
from pipeline.hf import LogitHead, hidden_states
from pipeline.train.losses import dense_forward_kl, kd_loss
from storage.formats import get_format
from storage.manifest import Manifest, fingerprint, read_manifest
from storage.reader import sequential_batches
from storage.writer import CacheDirectory, ShardPlan


def cached_gradient(student_logits: torch.Tensor, ids, logprobs, tail) -> torch.Tensor:
    """d(cached forward KL with tail bucket)/d(student logits), (N, V) float32."""
    s = student_logits.clone().requires_grad_(True)
    labels = torch.full((s.shape[0],), -100)
    (sparse,) = torch.autograd.grad(kd_loss(s, ids, logprobs, tail, labels).sum(), s)
    return sparse


def angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    cosine = torch.nn.functional.cosine_similarity(a.reshape(1, -1).double(), b.reshape(1, -1).double()).item()
    return math.degrees(math.acos(max(-1.0, min(1.0, cosine))))


def targets_for(teacher_logits: torch.Tensor, setting: dict, seq_len: int):
    """Reduce (N, V) teacher logits as a cache of ``setting`` would store them (ids, fp16-rounded log-probs, tail)."""
    if setting["mode"] == "topk":
        return _rounded(*topk_targets(teacher_logits, setting["k"], 1.0))
    draws = setting.get("samples", setting["k"])
    uniforms = torch.cat([sequence_uniforms(0, 0, i, seq_len, draws) for i in range(len(teacher_logits) // seq_len)])
    if setting["mode"] == "hybrid":
        return _rounded(*hybrid_targets(teacher_logits, setting["k"], uniforms, 1.0))
    return _rounded(*sample_targets(teacher_logits, uniforms, 1.0, min(draws, teacher_logits.shape[-1])))


def _rounded(ids, logprobs, tail):
    """Log-probs as stored: float16."""
    return ids, logprobs.half().float(), tail


def _shard_arrays(input_ids: np.ndarray, ids, logprobs, tail) -> dict[str, np.ndarray]:
    n, seq_len = input_ids.shape
    width = ids.shape[-1]
    return {"input_ids": input_ids.astype(np.int32), "topk_ids": ids.reshape(n, seq_len, width).numpy().astype(np.int32),
            "topk_logprobs": logprobs.reshape(n, seq_len, width).numpy().astype(np.float16),
            "tail_logprob": tail.reshape(n, seq_len).numpy().astype(np.float32),
            "loss_mask": np.ones((n, seq_len), dtype=np.uint8)}


def _write_cache(directory: Path, fmt, arrays: dict, copies: int, level: int) -> float:
    """Write ``copies`` shards of ``arrays`` through the storage writer; return the seconds spent on shards.

    The timing covers encoding, compression, the atomic write and the sha256
    of each shard. Done records and the manifest (a fixed cost per shard,
    about 0.3 ms for the fsync of a record here) are written after it.
    """
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    cache = CacheDirectory(directory, fingerprint({"storage_benchmark": str(directory)}))
    plans = [ShardPlan("train", index, 0, len(arrays["input_ids"]), fmt.suffix) for index in range(copies)]
    start = time.perf_counter()
    records = [cache.encode_shard(plan, fmt, arrays, level) for plan in plans]
    seconds = time.perf_counter() - start
    for plan, record in zip(plans, records):
        cache.mark_done(plan, record)
    cache.assemble(plans, Manifest(format=fmt.name), lambda folder: folder.mkdir())
    return seconds


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
    """One record per setting: bytes/token, write and read tokens/s (medians), unique ids and gradient angles."""
    seq_len = input_ids.shape[1]
    s = student.logits.clone().requires_grad_(True)
    (full,) = torch.autograd.grad(dense_forward_kl(s, teacher_logits).sum(), s)
    full_parameters = student.parameter_gradient(full)
    prepared = []
    for setting in settings:
        ids, logprobs, tail = targets_for(teacher_logits, setting, seq_len)
        cached = cached_gradient(student.logits, ids, logprobs, tail)
        angles = {"grad_angle_deg": angle_degrees(cached, full),
                  "param_angle_deg": angle_degrees(student.parameter_gradient(cached), full_parameters)}
        unique = float((ids >= 0).sum(-1).float().mean())
        prepared.append((setting, _shard_arrays(input_ids, ids, logprobs, tail), angles, unique))
    timings = {i: {"write": [], "read": []} for i in range(len(prepared))}
    sizes = {}
    for _ in range(repeats):  # interleave the settings so machine noise hits them alike
        for i, (setting, arrays, _, _) in enumerate(prepared):
            fmt = get_format(setting["format"])
            directory = scratch / f"setting-{i}"
            timings[i]["write"].append(_write_cache(directory, fmt, arrays, copies, setting["level"]))
            start = time.perf_counter()
            for _batch in sequential_batches(directory, "train", 64, verify=True):
                pass
            timings[i]["read"].append(time.perf_counter() - start)
            sizes[i] = read_manifest(directory).bytes
    records = []
    tokens = input_ids.size * copies
    for i, (setting, _, angles, unique) in enumerate(prepared):
        write, read = timings[i]["write"], timings[i]["read"]
        records.append({**setting, "bytes_per_token": sizes[i] / tokens,
                        "write_tok_per_s": tokens / statistics.median(write),
                        "write_spread": [tokens / max(write), tokens / min(write)],
                        "read_tok_per_s": tokens / statistics.median(read),
                        "read_spread": [tokens / max(read), tokens / min(read)],
                        "mean_ids": unique, "bytes_per_entry": sizes[i] / tokens / max(unique, 1e-9), **angles})
    shutil.rmtree(scratch, ignore_errors=True)
    return records


def default_settings() -> list[dict]:
    settings = [{"format": fmt, "mode": "topk", "k": k, "level": 3} for fmt in ("arrow", "zarr") for k in (8, 32, 64, 128)]
    settings += [{"format": fmt, "mode": "sample", "k": 50, "level": 3} for fmt in ("arrow", "zarr")]
    settings += [{"format": "arrow", "mode": mode, "k": k, "level": level}
                 for mode, k in (("topk", 64), ("sample", 50)) for level in (1, 9)]
    settings += [{"format": "arrow", "mode": "hybrid", "k": 8, "samples": 24, "level": 3},
                 {"format": "arrow", "mode": "sample", "k": 100, "level": 3}]
    return settings
