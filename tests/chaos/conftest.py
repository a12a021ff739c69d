"""Chaos fixtures: the sweep sizes, the seed, and the results file every sweep adds its figures to.

``make test`` runs a fast subset (``CHAOS_SCALE=fast``): 2 or 3 ``kill -9`` per stage (Arrow only for
stage 1), one preemption sweep (stage 2, one signal), disk full for stage 1 and the concurrency cases.
Cases marked ``full_scale`` (the Zarr kill sweep, the stage 3 kill sweep, the stage 1 and 3 preemption sweeps,
disk full for stages 2 and 3) are skipped there and run only with ``CHAOS_SCALE=full``. ``make chaos`` sets ``CHAOS_SCALE=full``
and ``CHAOS_RESULTS`` and gets ``results.json`` and ``results.md`` there.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import pytest
from helpers import skip_marked
from jobs import cache_overrides, distillery, on_policy_command, run_command, timed, train_overrides

# Interruptions per sweep, by scale.
SCALES = {
    "fast": {"cache": 2, "train": 3, "run": 3, "signals": 1},
    "full": {"cache": 20, "train": 20, "run": 10, "signals": 5},
}


FULL_SCALE = os.environ.get("CHAOS_SCALE", "fast") == "full"


def pytest_collection_modifyitems(config, items):
    if not FULL_SCALE:
        skip_marked(items, "full_scale", "CHAOS_SCALE=full only: `make chaos` runs it")


@pytest.fixture(scope="session")
def scale() -> dict:
    return SCALES[os.environ.get("CHAOS_SCALE", "fast")]


@pytest.fixture(scope="session")
def seed() -> str:
    return os.environ.get("CHAOS_SEED", "0")


class ChaosResults:
    """Rows of the results table; written as JSON and Markdown at the end of the session."""

    def __init__(self):
        self.sweeps: list[dict] = []
        self.cases: list[dict] = []

    def add_sweep(self, stage: str, summary: dict, outcome: str) -> None:
        self.sweeps.append({"stage": stage, **summary, "outcome": outcome})

    def add_case(self, group: str, case: str, outcome: str) -> None:
        self.cases.append({"group": group, "case": case, "outcome": outcome})

    def write(self, directory: Path, seed: str, scale: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
        data = {"seed": seed, "scale": scale, "cpu": cpu, "cores": os.cpu_count(),
                "date": time.strftime("%Y-%m-%d"), "sweeps": self.sweeps, "cases": self.cases}
        (directory / "results.json").write_text(json.dumps(data, indent=2) + "\n")
        (directory / "results.md").write_text(self.markdown(data))

    def markdown(self, data: dict) -> str:
        lines = [f"# Chaos results ({data['date']}, seed {data['seed']}, scale {data['scale']}, "
                 f"{data['cpu']}, {data['cores']} cores)", "",
                 "| stage | sweep | signal | interruptions | of them mid-write | trials | launches | exit codes "
                 "| outcome |", "|---|---|---|---|---|---|---|---|---|"]
        for s in data["sweeps"]:
            codes = ", ".join(str(c) for c in s["exit_codes"])
            lines.append(f"| {s['stage']} | {s['sweep']} | {s['signal']} | {s['interruptions']} | "
                         f"{s['interrupted_mid_write']} | {s['trials']} | {s['launches']} | {codes} | {s['outcome']} |")
        lines += ["", "| group | case | outcome |", "|---|---|---|"]
        lines += [f"| {c['group']} | {c['case']} | {c['outcome']} |" for c in data["cases"]]
        return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def chaos_results():
    results = ChaosResults()
    yield results
    target = os.environ.get("CHAOS_RESULTS")
    if target:
        results.write(Path(target), os.environ.get("CHAOS_SEED", "0"), os.environ.get("CHAOS_SCALE", "fast"))


@pytest.fixture(scope="session")
def chaos_teacher(workdir, tokenizer_dir) -> Path:
    """A random Llama large enough that the teacher pass, not the start-up, takes most of a cache run."""
    from pipeline.demo.init_model import build_model

    return build_model(tokenizer_dir, workdir / "chaos-llama", arch="llama", hidden=128, layers=4, heads=4,
                       max_positions=256)


@pytest.fixture(scope="session")
def chaos_corpus(workdir) -> Path:
    """About 150 KB of text: some 120 shards of 4 sequences of 128 tokens."""
    from pipeline.demo.tokenizer import corpus_texts

    path = workdir / "chaos-docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts(limit_bytes=150_000)))
    return path


@pytest.fixture(scope="session")
def reference_cache(tmp_path_factory, chaos_teacher, chaos_corpus) -> tuple[Path, float]:
    """An uninterrupted Arrow cache, and its wall time (the horizon of the kill times)."""
    output = tmp_path_factory.mktemp("reference") / "cache"
    return output, timed(distillery("cache", *cache_overrides(chaos_teacher, chaos_corpus, output, "arrow")))


@pytest.fixture(scope="session")
def reference_training(tmp_path_factory, reference_cache) -> tuple[Path, float]:
    """An uninterrupted training run on the reference cache, and its wall time."""
    output = tmp_path_factory.mktemp("reference") / "train"
    return output, timed(distillery("train", *train_overrides(reference_cache[0], output)))


@pytest.fixture(scope="session")
def on_policy_inputs(workdir, tokenizer_dir) -> tuple[Path, Path]:
    """A small student that writes, and 24 chat prompts (verse recitations)."""
    import gzip

    from pipeline.demo.init_model import build_model
    from pipeline.demo.tokenizer import QA_CORPUS

    prompts = workdir / "chaos-prompts.jsonl"
    with gzip.open(QA_CORPUS, "rt") as source:
        prompts.write_text("".join(next(source) for _ in range(24)))
    student = build_model(tokenizer_dir, workdir / "chaos-student", arch="llama", hidden=16, layers=1, heads=2,
                          max_positions=256)
    return student, prompts


@pytest.fixture(scope="session")
def reference_on_policy_run(tmp_path_factory, llama_dir, on_policy_inputs) -> tuple[Path, float]:
    """An uninterrupted 2-round on-policy ``distillery run``, and its wall time."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    return run_dir, timed(on_policy_command(llama_dir, *on_policy_inputs)(run_dir, 0))


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, llama_dir, corpus_jsonl) -> tuple[Path, float]:
    """An uninterrupted 2-round ``distillery run``, and its wall time."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    return run_dir, timed(run_command(llama_dir, corpus_jsonl)(run_dir, 0))
