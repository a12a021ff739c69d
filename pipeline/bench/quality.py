"""Distillation quality: train students for equal steps and score them against the live teacher."""
from __future__ import annotations

import time
from pathlib import Path

from pipeline.config_loading import load_config
from pipeline.train.config import TrainJob
from pipeline.train.evaluate import score_against_teacher
from pipeline.train.run import train_from_cache
from storage.manifest import read_manifest


def train_and_score(name: str, overrides: list[str], teacher_dir: Path, eval_cache: Path) -> dict:
    """Train one student with ``distillery train`` overrides, then score it against the teacher."""
    start = time.perf_counter()
    final = train_from_cache(load_config(TrainJob, None, overrides))
    seconds = time.perf_counter() - start
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
            overrides = [f"cache.dir={caches[cache_name]}", f"train.seed={seed}", f"student.seed={seed}",
                         f"train.out_dir={out / f'{name}-seed{seed}'}", "train.resume=never",
                         *common, *(e.format(teacher=teacher) for e in extra)]
            record = train_and_score(name, overrides, teacher, caches["topk8"])
            records.append({**record, "seed": seed, "cache_bytes_per_token": _bytes_per_token(caches[cache_name])})
    return records


def _bytes_per_token(cache_dir: Path) -> float:
    manifest = read_manifest(cache_dir)
    return manifest.bytes / manifest.tokens


def summarize_quality(records: list[dict], reference: str = "online_full_kd") -> list[dict]:
    """Per setting: the mean over seeds and the min-max spread of each metric.

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
            row[f"{metric}_spread"] = max(values) - min(values)
        paired = [r["kl"] / reference_kl[r["seed"]] for r in group if r["seed"] in reference_kl]
        if paired:
            row["kl_over_online"] = sum(paired) / len(paired)
            row["kl_over_online_spread"] = [min(paired), max(paired)]
        rows.append(row)
    return rows
