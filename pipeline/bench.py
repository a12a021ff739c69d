"""``distillery bench``: measure the pipeline and write ``results.json`` plus ``results.md``.

Builds its own tokenizer and random-init teacher under ``--out`` so it runs
offline. ``--quick`` uses a tiny teacher and little data: a smoke test of
the benchmark itself, never a timing.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from pipeline.bench_stage1 import run_settings
from pipeline.models import build_model
from pipeline.tokenizer import CORPUS, build_tokenizer
from storage.atomic import write_text

FULL = {"hidden": 384, "layers": 6, "heads": 6, "vocab": 8192, "tokens": 1_000_000, "seq_len": 512}
QUICK = {"hidden": 32, "layers": 1, "heads": 2, "vocab": 512, "tokens": 4096, "seq_len": 64}


def stage1_settings(out: Path, teacher: Path, size: dict) -> list[list[str]]:
    base = [f"teacher.model={teacher}", "teacher.dtype=bf16", f"data.path={CORPUS}", f"data.seq_len={size['seq_len']}",
            f"data.max_tokens={size['tokens']}", f"cache.dir={out / 'scratch-cache'}", "device=cpu"]
    modes = [["cache.mode=topk", "cache.top_k=64"], ["cache.mode=sample", "cache.samples=50"]]
    return [base + [f"cache.format={fmt}"] + mode for fmt in ("arrow", "zarr") for mode in modes]


def markdown_table(records: list[dict], columns: list[str]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in records]
    return "\n".join(lines)


def run_bench(out: str | Path, quick: bool = False) -> Path:
    """Run every benchmark section; return the path of the Markdown summary."""
    out = Path(out)
    size = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = out / f"tokenizer-{size['vocab']}"
    if not tokenizer.exists():
        build_tokenizer(tokenizer, vocab_size=size["vocab"])
    teacher = out / f"teacher-h{size['hidden']}-l{size['layers']}"
    if not teacher.exists():
        build_model(tokenizer, teacher, hidden=size["hidden"], layers=size["layers"], heads=size["heads"])
    start = time.time()
    stage1 = run_settings(stage1_settings(out, teacher, size))
    results = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "teacher": {"hidden": size["hidden"], "layers": size["layers"], "vocab": size["vocab"], "random_init": True},
        "seconds": time.time() - start,
        "stage1": stage1,
    }
    write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    columns = ["format", "mode", "width", "tokens", "cache_tok_per_s", "forward_tok_per_s", "cache_over_forward",
               "bytes_per_token", "peak_rss_mb"]
    write_text(out / "results.md", "## Stage 1\n\n" + markdown_table(stage1, columns) + "\n")
    return out / "results.md"
