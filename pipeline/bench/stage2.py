"""Stage-2 step cost: CE, cached KD and online KD steps timed interleaved in one process.

Each round runs one optimizer step of every setting in turn on the same
batch shape, so machine noise hits all settings alike; medians and the
min-max spread are reported. Data loading is excluded from step time and
measured separately as the fraction of a real training loop spent waiting.
"""
from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from pipeline.bench.stage1 import synchronized_clock
from pipeline.models.head import LogitHead
from pipeline.models.hf import load_model
from pipeline.train.config import LossConfig, StudentConfig
from pipeline.train.step import LossFacts, combine, micro_batch_sums, token_counts
from pipeline.train.student import build_student
from storage import (
    CacheDirectory,
    ShardPlan,
    SoftTargetStream,
    StreamOrder,
    fingerprint,
    get_backend,
    open_cache,
    read_manifest,
)

CPU = torch.device("cpu")


def train_step_setting(cache_dir: Path, student: dict, batch_size: int, loss: LossConfig, device: torch.device,
                       chunk_size: int, teacher=None):
    """A callable that runs one optimizer step of a fresh ``student`` on the cache's first batch and returns its
    seconds: the unit the step-cost comparisons time."""
    from transformers import AutoTokenizer

    manifest = read_manifest(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(Path(cache_dir) / manifest.tokenizer_dir))
    model = build_student(StudentConfig(config=dict(student)), manifest.vocab_size, tokenizer).to(device).train()
    batch = {name: tensor.to(device) for name, tensor in
             next(iter(SoftTargetStream(cache_dir, StreamOrder(batch_size), prefetch_depth=0))).items()}
    facts = LossFacts(manifest.tokenizer_length, manifest.temperature)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        start = synchronized_clock(device)
        kd_tokens, ce_tokens = token_counts(batch).tolist()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            kd_sum, ce_sum = micro_batch_sums(model, LogitHead.of(model), batch, loss, facts, chunk_size, teacher)
        combine(kd_sum, ce_sum, kd_tokens, ce_tokens, loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return synchronized_clock(device) - start

    return step


def step_ratios(topk_cache: Path, sample_cache: Path, teacher_dir: Path, student: dict, batch_size: int,
                rounds: int = 15, device: torch.device = CPU, chunk_size: int = 1024) -> dict:
    """Median step seconds of CE, cached top-k KD, cached sample KD and online KD, and their ratios."""
    teacher = load_model(str(teacher_dir), device)
    settings = {
        "ce": train_step_setting(topk_cache, student, batch_size, LossConfig(kind="ce"), device, chunk_size),
        "kd_topk": train_step_setting(topk_cache, student, batch_size, LossConfig(), device, chunk_size),
        "kd_sample": train_step_setting(sample_cache, student, batch_size, LossConfig(), device, chunk_size),
        "kd_online": train_step_setting(topk_cache, student, batch_size, LossConfig(teacher_live=str(teacher_dir)), device,
                              chunk_size, teacher),
    }
    times = {name: [] for name in settings}
    for round_index in range(rounds + 2):
        for name, step in settings.items():
            seconds = step()
            if round_index >= 2:  # the first rounds warm up allocators and caches
                times[name].append(seconds)
    median = {name: statistics.median(t) for name, t in times.items()}
    record = {"loss_chunk": chunk_size, **{f"{name}_step_s": median[name] for name in settings}}
    record.update({f"{name}_spread_s": [min(t), max(t)] for name, t in times.items()})
    record.update(
        kd_topk_over_ce=median["kd_topk"] / median["ce"],
        kd_sample_over_ce=median["kd_sample"] / median["ce"],
        online_over_kd_sample=median["kd_online"] / median["kd_sample"],
        online_over_kd_topk=median["kd_online"] / median["kd_topk"],
    )
    return record


def peak_rss_of_training(overrides: list[str]) -> dict:
    """Train in a fresh process; return its peak RSS (MB) and the data-wait fraction it logged."""
    script = ("import json, sys\n"
              "from pipeline.bench.stage1 import peak_rss_mb_of_this_process\n"
              "from pipeline.config_loading import load_config\n"
              "from pipeline.train.config import TrainJob\n"
              "from pipeline.train.run import train_from_cache\n"
              "final = train_from_cache(load_config(TrainJob, None, sys.argv[1:]))\n"
              "records = [json.loads(l) for l in (final.parent / 'metrics.jsonl').read_text().splitlines()]\n"
              "last = [r for r in records if r['type'] == 'train'][-1]\n"
              "print(json.dumps({'peak_rss_mb': peak_rss_mb_of_this_process(), 'data_wait': last['data_wait'],\n"
              "                  'startup_wait_s': last['startup_wait_s']}))\n")
    done = subprocess.run([sys.executable, "-c", script, *overrides], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def rewritten_cache(source: Path, target: Path, identity: dict, note: str, shards) -> Path:
    """A new cache at ``target`` holding ``shards(manifest, backend)``: ``(ShardPlan, arrays)`` pairs made from
    ``source``'s shards, written by the storage writer (so it has its own done records and manifest) under a
    fingerprint of its own, with ``source``'s tokenizer."""
    shutil.rmtree(target, ignore_errors=True)
    cache_in = open_cache(source)
    manifest = cache_in.manifest
    backend = get_backend(manifest.format)
    cache = CacheDirectory(target, fingerprint(identity))
    target.mkdir(parents=True)
    cache.claim(f"# {note}\n")
    plans = []
    for plan, arrays in shards(cache_in, backend):
        cache.write_shard(plan, backend, arrays, manifest.compression["level"])
        plans.append(plan)
    tokenizer = source / manifest.tokenizer_dir
    cache.assemble(plans, manifest, lambda folder: shutil.copytree(tokenizer, folder))
    return target


def replicated_cache(source: Path, target: Path, copies: int) -> Path:
    """A cache whose train split holds every train shard of ``source`` ``copies`` times."""

    def shards(opened, backend):
        index = {"train": 0, "eval": 0}
        for copy in range(copies):
            for record in opened.manifest.shards:
                if record.split != "train" and copy > 0:
                    continue
                yield ShardPlan(record.split, index[record.split], 0, record.sequences, backend.suffix), \
                    backend.read(opened.store.path(record))
                index[record.split] += 1

    identity = {"replica_of": read_manifest(source).fingerprint, "copies": copies}
    return rewritten_cache(source, target, identity, f"{copies} copies of the train shards of {source}", shards)


def memory_records(cache_dir: Path, common: list[str], out: Path) -> list[dict]:
    """Peak RSS and data wait of the same training run on a cache and on one 10x larger."""
    records = []
    for copies in (1, 10):
        source = cache_dir if copies == 1 else replicated_cache(cache_dir, out / "cache-x10", copies)
        figures = peak_rss_of_training([f"cache.dir={source}", f"train.out_dir={out / f'rss-x{copies}'}",
                                         "train.resume=never", *common])
        records.append({"cache_copies": copies, **figures})
    return records
