"""Stage-1 benchmark: cache throughput against a bare teacher forward, bytes/token and peak RSS.

Each setting runs in a fresh subprocess so peak RSS belongs to it alone. The
whole cache pass runs first (every shard, the writer thread) for absolute
throughput, its time breakdown and peak RSS. Then the ratio is measured interleaved:
batch by batch, a bare ``model(input_ids)`` forward and the cache's
``batch_targets`` on the same ids, alternately, so machine noise hits both
alike; medians and min-max spreads are reported. The end-to-end ratio
alternates in the same way shard by shard, with shard writes included.
The machine's speed drifts by tens of percent over minutes, so only
interleaved ratios are comparable.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.cache.config import CacheJob
from pipeline.cache.plan import make_plan
from pipeline.cache.teacher_pass import batch_targets, load_teacher, write_shards
from pipeline.config_loading import load_config, to_yaml
from pipeline.log import get_logger
from pipeline.models.device import resolve_device
from pipeline.models.head import LogitHead
from storage import read_manifest

log = get_logger("bench")


def peak_rss_mb_of_this_process() -> float:
    """VmHWM: the peak resident set of this process's own address space.

    ``getrusage(...).ru_maxrss`` is not used: it keeps the parent's peak
    across fork and exec, so every benchmark child would report the parent's.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: an upper bound


def synchronized_clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def interleaved_batch_times(plan, model, device: torch.device, max_batches: int = 24) -> dict:
    """Per-batch seconds of a bare forward and of ``batch_targets``, alternated on the same ids.

    The first two batches warm up kernels and allocators and are not counted.
    """
    head = LogitHead.of(model)
    split = plan.splits["train"]
    batch = plan.job.cache.batch_size
    starts = list(range(0, len(split.input_ids) - batch + 1, batch))[: max_batches + 2]
    times: dict[str, list[float]] = {"forward": [], "cache": []}
    with torch.inference_mode():
        for index, lo in enumerate(starts):
            ids = torch.from_numpy(split.input_ids[lo : lo + batch]).long().to(device)
            begin = synchronized_clock(device)
            model(input_ids=ids, use_cache=False)
            middle = synchronized_clock(device)
            batch_targets(model, head, plan, "train", lo, ids)
            end = synchronized_clock(device)
            if index >= 2:
                times["forward"].append(middle - begin)
                times["cache"].append(end - middle)
    forward, cache = statistics.median(times["forward"]), statistics.median(times["cache"])
    tokens = batch * split.input_ids.shape[1]
    return {"batches": len(times["cache"]), "forward_tok_per_s": tokens / forward, "batch_cache_tok_per_s": tokens / cache,
            "cache_over_forward": forward / cache,
            "cache_over_forward_spread": [min(f / c for f, c in zip(times["forward"], times["cache"], strict=True)),
                                          max(f / c for f, c in zip(times["forward"], times["cache"], strict=True))]}


def interleaved_shard_times(plan, model, device: torch.device, max_shards: int = 4) -> dict:
    """End to end, shard by shard: a bare forward over a shard's batches, then writing that shard, alternately.

    Each shard goes through ``write_shards`` with its own writer, flushed at
    the end, so no write overlaps the next shard: a conservative figure. The
    first shard warms up and is not counted, unless it is the only one.
    """
    shards = [s for s in plan.shards if s.split == "train"][: max_shards + 1]
    batch = plan.job.cache.batch_size
    ratios = []
    for shard in shards:
        input_ids = plan.splits["train"].input_ids[shard.start : shard.start + shard.count]
        begin = synchronized_clock(device)
        with torch.inference_mode():
            for lo in range(0, len(input_ids), batch):
                model(input_ids=torch.from_numpy(input_ids[lo : lo + batch]).long().to(device), use_cache=False)
        middle = synchronized_clock(device)
        write_shards(plan, [shard], device, 0, model)
        end = synchronized_clock(device)
        ratios.append((middle - begin) / (end - middle))
    counted = ratios[1:] or ratios
    return {"end_to_end_over_forward": statistics.median(counted), "end_to_end_spread": [min(counted), max(counted)]}


def measure_one(overrides: list[str], keep: bool = False) -> dict:
    """Run one cache setting and the bare forward in this process; return flat figures.

    The cache is deleted afterwards unless ``keep``.
    """
    job = load_config(CacheJob, None, overrides)
    plan = make_plan(job)
    shutil.rmtree(plan.directory, ignore_errors=True)
    plan.directory.mkdir(parents=True)
    plan.cache.claim(to_yaml(job))
    device = resolve_device(job.device)
    model = load_teacher(plan, device)
    start = time.perf_counter()
    times = write_shards(plan, plan.shards, device, 0, model)
    cache_seconds = time.perf_counter() - start
    plan.cache.assemble(plan.shards, plan.header, lambda folder: plan.tokenizer.save_pretrained(str(folder)))
    peak_rss_mb = peak_rss_mb_of_this_process()
    interleaved = interleaved_batch_times(plan, model, device)
    interleaved.update(interleaved_shard_times(plan, model, device))
    manifest = read_manifest(plan.directory)
    tokens, size = manifest.tokens, manifest.bytes
    if not keep:
        shutil.rmtree(plan.directory)
    return {
        "format": job.cache.format, "mode": job.cache.mode, "width": plan.width, "dtype": plan.teacher_dtype,
        "chunk_size": job.cache.chunk_size, "tokens": tokens,
        "cache_tok_per_s": tokens / cache_seconds, **interleaved,
        "teacher_s": times.teacher, "writer_wait_s": times.writer_wait, "final_flush_s": times.final_flush,
        "other_s": cache_seconds - times.teacher - times.writer_wait - times.final_flush,
        "bytes_per_token": size / tokens, "peak_rss_mb": peak_rss_mb,
    }


def run_settings(settings: list[list[str]]) -> list[dict]:
    """Measure each setting in its own subprocess."""
    records = []
    for overrides in settings:
        out = subprocess.run([sys.executable, "-m", "pipeline.bench.stage1", *overrides],
                             check=True, capture_output=True, text=True)
        records.append(json.loads(out.stdout.strip().splitlines()[-1]))
        log.info(json.dumps(records[-1]))
    return records


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("overrides", nargs="*")
    print(json.dumps(measure_one(parser.parse_args().overrides)))
