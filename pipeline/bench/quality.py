"""Distillation quality: train students for equal steps and score them against the live teacher."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from pipeline.cache.config import CacheJob
from pipeline.cache.run import run_cache
from pipeline.config_loading import load_config
from pipeline.demo.tokenizer import CORPUS
from pipeline.train.config import TrainJob
from pipeline.train.evaluate import score_against_teacher
from pipeline.train.run import train_from_cache
from storage import read_manifest


def build_cache(teacher: Path, root: Path, seq_len: int, max_tokens: int, extra: list[str], holdout: float = 0.02,
                eval_tokens: int | None = None) -> Path:
    """A cache of the shipped KJV corpus under ``root/caches`` (found again, not rebuilt, on a second call)."""
    overrides = [f"teacher.model={teacher}", f"data.path={CORPUS}", f"data.seq_len={seq_len}",
                 f"data.holdout_fraction={holdout}", f"data.max_tokens={max_tokens}", f"cache.root={root / 'caches'}",
                 "cache.shard_size=64", "device=cpu", *extra]
    if eval_tokens is not None:
        overrides.append(f"data.eval_max_tokens={eval_tokens}")
    return run_cache(load_config(CacheJob, None, overrides)).directory


def train_common(student: dict, steps: int, batch: int, warmup: int = 5, eval_batches: int = 4, log_every: int = 5,
                 checkpoints: int = 0) -> list[str]:
    """``distillery train`` overrides shared by every quality run: the student, the schedule and CPU; with
    ``checkpoints``, that many checkpoints evenly spaced over the run, all kept (else none)."""
    every = steps // checkpoints if checkpoints else 0
    return [f"student.config={json.dumps(student)}", f"train.steps={steps}", f"train.batch_size={batch}",
            "train.lr=0.003", f"train.warmup_steps={warmup}", "train.eval_every=0", f"train.eval_batches={eval_batches}",
            f"train.checkpoint_every={every}", f"train.keep_checkpoints={max(checkpoints, 1)}",
            f"train.log_every={log_every}", "device=cpu"]


def arm_overrides(cache_dir: Path, seed: int, out_dir: Path, common: list[str], extra: list[str],
                  teacher: Path) -> list[str]:
    """One run of a setting: its cache, seed (initialisation and data order, so settings pair by seed) and
    output folder; ``{teacher}`` in ``extra`` stands for the teacher folder."""
    return [f"cache.dir={cache_dir}", f"train.seed={seed}", f"student.seed={seed}", f"train.out_dir={out_dir}",
            "train.resume=never", *common, *(e.format(teacher=teacher) for e in extra)]


def train_student(overrides: list[str]) -> tuple[Path, float]:
    """Train one student with ``distillery train`` overrides: its ``final/`` folder and the seconds it took."""
    start = time.perf_counter()
    final = train_from_cache(load_config(TrainJob, None, overrides))
    return Path(final), time.perf_counter() - start


def train_and_score(name: str, overrides: list[str], teacher_dir: Path, eval_cache: Path) -> dict:
    """Train one student with ``distillery train`` overrides, then score it against the teacher."""
    final, seconds = train_student(overrides)
    return {"student": name, "train_seconds": seconds, "final": str(final),
            **score_against_teacher(final, teacher_dir, eval_cache)}


QUALITY_SETTINGS = [
    ("ce_only", "topk8", ["loss.kind=ce"]),
    *[(f"topk{k}_{tail}", f"topk{k}", [f"loss.tail={tail}"]) for k in (8, 64)
      for tail in ("bucket", "ground_truth", "renormalize")],
    # 8-bit head log-probs, with the tail handling of the best top-64 arm (ground truth, in `make bench`).
    ("topk64_8bit_ground_truth", "topk64_8bit", ["loss.tail=ground_truth"]),
    ("topk64_bucket_alpha0.5", "topk64", ["loss.alpha=0.5"]),
    ("sample50", "sample50", []),
    ("sample100", "sample100", []),
    ("hybrid8+24", "hybrid8+24", []),
    ("online_full_kd", "topk8", ["loss.teacher_live={teacher}"]),
]
# The comparisons the targets are about (sampled caches against online KD and CE) get extra seeds.
KEY_SETTINGS = ("ce_only", "sample50", "sample100", "hybrid8+24", "online_full_kd")
CACHE_SETTINGS = {
    "topk8": ["cache.mode=topk", "cache.top_k=8"],
    "topk64": ["cache.mode=topk", "cache.top_k=64"],
    "topk64_8bit": ["cache.mode=topk", "cache.top_k=64", "cache.logprob_bits=8"],
    "sample50": ["cache.mode=sample", "cache.samples=50"],
    "sample100": ["cache.mode=sample", "cache.samples=100"],
    "hybrid8+24": ["cache.mode=hybrid", "cache.top_k=8", "cache.samples=24"],
}


def quality_records(teacher: Path, caches: dict[str, Path], common: list[str], out: Path, seeds: int,
                    key_seeds: int, subset: int | None = None) -> list[dict]:
    """The QUALITY_SETTINGS (the first ``subset``) for ``seeds`` seeds, KEY_SETTINGS for ``key_seeds``.

    A seed fixes the student's initialisation and its data order, so runs of
    different settings with the same seed are paired.
    """
    records = []
    for seed in range(max(seeds, key_seeds)):
        for name, cache_name, extra in QUALITY_SETTINGS[:subset]:
            if seed >= (key_seeds if name in KEY_SETTINGS else seeds):
                continue
            overrides = arm_overrides(caches[cache_name], seed, out / f"{name}-seed{seed}", common, extra, teacher)
            record = train_and_score(name, overrides, teacher, caches["topk8"])
            records.append({**record, "seed": seed, "cache_bytes_per_token": bytes_per_token(caches[cache_name])})
    return records


def bytes_per_token(cache_dir: Path) -> float:
    manifest = read_manifest(cache_dir)
    return manifest.bytes / manifest.tokens


def summarize_quality(records: list[dict], reference: str = "online_full_kd") -> list[dict]:
    """Per setting: the mean and median over seeds and the min-max spread of each metric.

    ``kl_over_online`` is the mean over seeds of KL / the ``reference`` run's KL
    with the same seed: the paired comparison, which cancels the seed's share
    of the noise.
    """
    reference_kl = {r["seed"]: r["kl"] for r in records if r["student"] == reference}
    rows = []
    for name in dict.fromkeys(r["student"] for r in records):
        group = [r for r in records if r["student"] == name]
        row = {"student": name, "seeds": len(group), "bytes_per_token": group[0]["cache_bytes_per_token"]}
        for metric in ("kl", "ppl", "top1", "ece"):
            values = [r[metric] for r in group]
            row[metric] = sum(values) / len(values)
            row[f"{metric}_median"] = statistics.median(values)
            row[f"{metric}_spread"] = max(values) - min(values)
        paired = [r["kl"] / reference_kl[r["seed"]] for r in group if r["seed"] in reference_kl]
        if paired:
            row["kl_over_online"] = sum(paired) / len(paired)
            row["kl_over_online_spread"] = [min(paired), max(paired)]
        rows.append(row)
    return rows
