"""Stage-1 benchmark: cache throughput against a bare teacher forward, bytes/token and peak RSS.

Each setting runs in a fresh subprocess so peak RSS belongs to it alone. In
that process the cache pass runs first (its peak RSS is read right after),
then a bare ``model(input_ids)`` forward over the very same batches, so the
ratio compares the two side by side on a machine in the same state.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.cache import _write_shards, make_plan
from pipeline.cache_dir import assemble_manifest, claim
from pipeline.config import CacheJob
from pipeline.config_loading import load_config, to_yaml
from pipeline.teacher import load_model, resolve_device
from storage.manifest import read_manifest


def peak_rss_mb_of_this_process() -> float:
    """VmHWM: the peak resident set of this process's own address space.

    ``getrusage(...).ru_maxrss`` is not used: it keeps the parent's peak
    across fork and exec, so every benchmark child would report the parent's.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: an upper bound


def bare_forward_seconds(job: CacheJob, plan) -> float:
    """Wall time of loading the teacher and running ``model(input_ids)`` over every batch of the plan."""
    start = time.perf_counter()
    device = resolve_device(job.device)
    model = load_model(job.teacher, device)
    batch = job.cache.batch_size
    with torch.inference_mode():
        for split in plan.splits.values():
            for lo in range(0, len(split.input_ids), batch):
                model(input_ids=torch.from_numpy(split.input_ids[lo : lo + batch]).long().to(device), use_cache=False)
    return time.perf_counter() - start


def measure_one(overrides: list[str]) -> dict:
    """Run one cache setting and the bare forward in this process; return flat figures."""
    job = load_config(CacheJob, None, overrides)
    plan = make_plan(job)
    shutil.rmtree(plan.directory, ignore_errors=True)
    plan.directory.mkdir(parents=True)
    claim(plan.directory, plan.fingerprint, to_yaml(job))
    start = time.perf_counter()
    _write_shards(plan, plan.shards, resolve_device(job.device), 0)
    cache_seconds = time.perf_counter() - start
    assemble_manifest(plan.directory, plan.shards, plan.header, plan.tokenizer)
    peak_rss_mb = peak_rss_mb_of_this_process()
    forward_seconds = bare_forward_seconds(job, plan)
    manifest = read_manifest(plan.directory)
    tokens = sum(s["tokens"] for s in manifest.shards)
    size = sum(s["bytes"] for s in manifest.shards)
    shutil.rmtree(plan.directory)
    return {
        "format": job.cache.format, "mode": job.cache.mode, "width": plan.width, "dtype": job.teacher.dtype,
        "chunk_size": job.cache.chunk_size, "tokens": tokens,
        "cache_tok_per_s": tokens / cache_seconds, "forward_tok_per_s": tokens / forward_seconds,
        "cache_over_forward": forward_seconds / cache_seconds,
        "bytes_per_token": size / tokens, "peak_rss_mb": peak_rss_mb,
    }


def run_settings(settings: list[list[str]]) -> list[dict]:
    """Measure each setting in its own subprocess."""
    records = []
    for overrides in settings:
        out = subprocess.run([sys.executable, "-m", "pipeline.bench_stage1", *overrides],
                             check=True, capture_output=True, text=True)
        records.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(records[-1]), file=sys.stderr, flush=True)
    return records


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("overrides", nargs="*")
    print(json.dumps(measure_one(parser.parse_args().overrides)))
