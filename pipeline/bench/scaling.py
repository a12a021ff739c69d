"""Stage-1 memory against data size: peak RSS of one part's plan, token store and shard rows, at 1x and 10x data.

Each size runs in a fresh subprocess, so its VmHWM is its own. The part
builds the token store (it is the first part), plans the shards, and reads
the rows of its own shards from the memory-mapped store, as the teacher pass
would. The shard size and the number of parts are fixed, so at 10x data the
part reads 10x the rows; the store's memory map pages for those rows are
what may grow (5 bytes per token plus the row's record-batch header).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.bench.stage1 import peak_rss_mb_of_this_process
from pipeline.cache.config import CacheJob
from pipeline.cache.plan import make_plan
from pipeline.config_loading import load_config
from pipeline.demo.tokenizer import corpus_texts
from storage import shards_of_part


def generated_corpus(path: Path, documents: int, words_per_document: int = 100, seed: int = 0) -> Path:
    """JSONL of documents whose words are drawn from the shipped corpus, so the tokenizer sees real words."""
    vocabulary = np.array(" ".join(corpus_texts(limit_bytes=200_000)).split())
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for _ in range(documents):
            words = vocabulary[rng.integers(0, len(vocabulary), words_per_document)]
            handle.write(json.dumps({"text": " ".join(words)}) + "\n")
    return path


def measure_part(overrides: list[str], part: int, parts: int) -> dict:
    """In this process: plan (building the token store) and read part ``part`` of ``parts``'s rows."""
    plan = make_plan(load_config(CacheJob, None, overrides))
    rows = checksum = 0
    for index in shards_of_part(len(plan.shards), part, parts):
        shard = plan.shards[index]
        split = plan.splits[shard.split]
        checksum += int(split.input_ids[shard.start : shard.start + shard.count].sum())
        checksum += int(split.loss_mask[shard.start : shard.start + shard.count].sum())
        rows += shard.count
    return {"peak_rss_mb": peak_rss_mb_of_this_process(), "tokens": sum(s.tokens for s in plan.splits.values()),
            "documents": sum(s.documents for s in plan.splits.values()), "part_rows": rows, "checksum": checksum}


def memory_records(teacher: Path, out: Path, documents: int, seq_len: int, shard_size: int = 64, parts: int = 4,
                   factors: tuple[int, ...] = (1, 10)) -> list[dict]:
    """Peak RSS of part 0 at each data factor, each in a fresh process; the last record carries the ratio."""
    records = []
    for factor in factors:
        folder = out / f"stage1-memory-{factor}"
        shutil.rmtree(folder, ignore_errors=True)  # a reused store would measure no tokenization
        data = generated_corpus(folder / "docs.jsonl", documents * factor)
        overrides = [f"teacher.model={teacher}", f"data.path={data}", f"data.seq_len={seq_len}",
                     f"cache.dir={folder / 'cache'}", f"cache.shard_size={shard_size}", "device=cpu"]
        done = subprocess.run([sys.executable, "-m", "pipeline.bench.scaling", "--parts", str(parts), *overrides],
                              check=True, capture_output=True, text=True)
        record = json.loads(done.stdout.strip().splitlines()[-1])
        records.append({"data_factor": factor, "shard_size": shard_size, "parts": parts, **record})
    records[-1]["rss_over_1x"] = records[-1]["peak_rss_mb"] / records[0]["peak_rss_mb"]
    return records


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("overrides", nargs="*")
    arguments = parser.parse_args()
    print(json.dumps(measure_part(arguments.overrides, 0, arguments.parts)))
