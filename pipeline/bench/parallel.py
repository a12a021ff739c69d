"""Stage-2 throughput of one process against two DDP and two FSDP2 ranks at the same global batch.

Each run is a fresh ``distillery train`` (under torchrun for two ranks); its
steady-state tokens per second come from ``metrics.jsonl`` (``tokens`` and
``elapsed_s`` between the first and last train records, so start-up is not
counted). Runs are interleaved round by round and reported as medians. On a
2-core CPU this is a sanity figure for the engines, not a scaling result.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

LAYOUTS = {"single": (1, 2), "ddp": (2, 1), "fsdp": (2, 1)}
"""strategy -> (processes, grad_accum): the same global batch for all three."""
ONE_GPU = {"single": (1, 1), "ddp": (1, 1), "fsdp": (1, 1)}
"""One process each: what the engines cost on one GPU."""


def steady_tokens_per_s(out_dir: Path) -> float:
    """Tokens per second between the first and the last train record of a run."""
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    trains = [r for r in map(json.loads, lines) if r["type"] == "train"]
    first, last = trains[0], trains[-1]
    return (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"])


def _train(strategy: str, layout: tuple[int, int], overrides: list[str], out_dir: Path) -> float:
    processes, accum = layout
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*(launcher if processes > 1 else [sys.executable]), "-m", "pipeline.cli", "-q", "train", *overrides,
               f"train.out_dir={out_dir}", f"train.strategy={strategy}", f"train.grad_accum={accum}",
               "train.resume=never"]
    # Two ranks share the 2 cores with one thread each; one process gets both.
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // processes))}
    subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return steady_tokens_per_s(out_dir)


def strategy_records(cache_dir: Path, common: list[str], out: Path, rounds: int,
                     layouts: dict[str, tuple[int, int]] = LAYOUTS) -> list[dict]:
    """Median steady-state tokens/s per strategy, and each one's ratio to ``single``."""
    overrides = [f"cache.dir={cache_dir}", *[c for c in common if not c.startswith("train.log_every")],
                 "train.log_every=1"]
    speeds: dict[str, list[float]] = {name: [] for name in layouts}
    for index in range(rounds):
        for strategy, layout in layouts.items():
            speeds[strategy].append(_train(strategy, layout, overrides, out / f"parallel-{strategy}-{index}"))
    single = statistics.median(speeds["single"])
    return [{"strategy": name, "processes": layouts[name][0], "grad_accum": layouts[name][1],
             "tok_per_s": statistics.median(values), "tok_per_s_spread": [min(values), max(values)],
             "over_single": statistics.median(values) / single} for name, values in speeds.items()]
