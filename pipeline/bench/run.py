"""``distillery bench``: measure the pipeline and write ``results.json`` plus ``results.md``.

Sections: ``storage``, ``storage_remote``, ``stage1``, ``stage1_memory``, ``stage2``, ``quality``, ``scaling``,
``parallel`` and ``generation``, each a list of flat records. Comparisons run interleaved in one process
(or one run) and report medians with min-max spreads. Everything is built
locally: the 8k BPE, a random-init 17M teacher for throughput, and the
pretrained teacher given with ``--teacher`` (``make bench`` passes the demo
teacher) for storage fidelity and quality. ``--quick`` shrinks everything to a
smoke test of the benchmark itself, never a timing.
"""
from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path

import torch

from pipeline.bench.generation import generation_records
from pipeline.bench.parallel import strategy_records
from pipeline.bench.quality import (
    CACHE_SETTINGS,
    build_cache,
    quality_records,
    summarize_quality,
    train_and_score,
    train_common,
)
from pipeline.bench.remote_read import DEFAULT_SHARD_SEQUENCES, remote_read_records
from pipeline.bench.scaling import memory_records as stage1_memory_records
from pipeline.bench.stage1 import run_settings
from pipeline.bench.stage2 import memory_records, peak_rss_of_training, step_ratios
from pipeline.bench.storage import StudentGradients, model_logits, storage_records
from pipeline.bench.storage_settings import default_settings
from pipeline.demo.init_model import build_model
from pipeline.demo.tokenizer import CORPUS, build_tokenizer
from storage import CacheNotFoundError, read_manifest, sequential_batches, write_text

STUDENT = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": False}
SMALL = {**STUDENT, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 1}
FULL = {"vocab": 8192, "hidden": 384, "layers": 6, "heads": 6, "stage1_tokens": 200_000, "seq_len": 512,
        "quality_tokens": 200_000, "quality_seq": 128, "steps": 80, "batch": 8, "seeds": 2, "key_seeds": 3,
        "scaling_tokens": 16_384, "memory_documents": 2000, "parallel_steps": 15, "students": (STUDENT, SMALL),
        "subset": None, "generation": {"rows": 64, "batch": 16, "new_tokens": 64, "repeats": 3}}
QUICK = {"vocab": 512, "hidden": 32, "layers": 1, "heads": 2, "stage1_tokens": 4096, "seq_len": 64,
         "quality_tokens": 4096, "quality_seq": 32, "steps": 3, "batch": 4, "seeds": 1, "key_seeds": 1,
         "scaling_tokens": 1024, "memory_documents": 100, "parallel_steps": 3,
         "students": ({**SMALL, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                       "num_key_value_heads": 2},) * 2, "subset": 3,
         "generation": {"rows": 4, "batch": 2, "new_tokens": 4, "repeats": 1}}


def markdown_table(records: list[dict], columns: list[str]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
        if isinstance(value, list):
            return "–".join(cell(v) for v in value)
        return f"{value:,}" if isinstance(value, int) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in records]
    return "\n".join(lines)


def stage1_settings(out: Path, teacher: Path, size: dict) -> list[list[str]]:
    base = [f"teacher.model={teacher}", "teacher.dtype=auto", f"data.path={CORPUS}", f"data.seq_len={size['seq_len']}",
            f"data.max_tokens={size['stage1_tokens']}", f"cache.dir={out / 'scratch-cache'}", "cache.shard_size=64",
            "device=cpu"]
    modes = [["cache.mode=topk", "cache.top_k=64"], ["cache.mode=sample", "cache.samples=50"]]
    settings = [base + [f"cache.format={fmt}"] + mode for fmt in ("arrow", "zarr") for mode in modes]
    settings += [base + ["cache.mode=sample", f"cache.chunk_size={chunk}"] for chunk in (64, 1024)]
    return settings[: size["subset"]]


def _given_teacher(teacher: Path | None, quick: bool) -> Path | None:
    """The pretrained teacher given with ``--teacher``, checked before any work; quick mode may go without."""
    if quick and teacher is None:
        return None
    if teacher is None or not (teacher / "config.json").is_file():
        raise CacheNotFoundError(f"bench --teacher {teacher}: no model folder there; `make bench` pretrains the "
                                 "demo teacher first (runs/demo/teacher/final), or pass any causal LM folder")
    return teacher


def _cache(teacher: Path, out: Path, size: dict, extra: list[str], max_tokens: int | None = None) -> Path:
    return build_cache(teacher, out, size["quality_seq"], max_tokens or size["quality_tokens"], extra)


def _train_common(size: dict, student: dict) -> list[str]:
    return train_common(student, size["steps"], size["batch"])


def run_bench(out: str | Path, quick: bool = False, teacher: str | Path | None = None) -> Path:
    """Run every benchmark section; return the path of the Markdown summary.

    ``teacher`` is the pretrained model of the quality and storage sections
    (required unless ``quick``); every path is absolute, so the working
    directory does not matter.
    """
    out = Path(out).resolve()
    size = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    tokenizer = out / f"tokenizer-{size['vocab']}"
    given = _given_teacher(Path(teacher).resolve() if teacher else None, quick)  # fail before any work
    if not tokenizer.exists():
        build_tokenizer(tokenizer, vocab_size=size["vocab"])
    random_teacher = out / f"teacher-h{size['hidden']}-l{size['layers']}"
    if not random_teacher.exists():
        build_model(tokenizer, random_teacher, hidden=size["hidden"], layers=size["layers"], heads=size["heads"])
    teacher = given or build_model(tokenizer, out / "quick-teacher", hidden=size["hidden"], layers=1, heads=2)
    results: dict = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                                 "threads": torch.get_num_threads()}}

    caches = {name: _cache(teacher, out, size, extra) for name, extra in CACHE_SETTINGS.items()}
    eval_ids = next(sequential_batches(caches["topk8"], "eval", 16))["input_ids"].numpy()
    common = _train_common(size, size["students"][0])
    reference = train_and_score("reference_student", [f"cache.dir={caches['sample50']}", "train.resume=never",
                                                      f"train.out_dir={out / 'reference'}", *common],
                                teacher, caches["topk8"])
    results["storage"] = storage_records(model_logits(teacher, eval_ids)[1], StudentGradients(Path(reference.pop("final")), eval_ids),
                                         eval_ids, default_settings()[: size["subset"]], out / "scratch-storage",
                                         copies=2 if quick else 8, repeats=1 if quick else 3)
    results["stage1"] = run_settings(stage1_settings(out, random_teacher, size))
    results["stage1_memory"] = stage1_memory_records(random_teacher, out, size["memory_documents"], size["seq_len"])
    ratios = step_ratios(caches["topk64"], caches["sample50"], teacher, size["students"][0], size["batch"],
                         rounds=2 if quick else 15)
    results["stage2"] = [ratios, *memory_records(caches["sample50"], common, out)]
    results["storage_remote"] = remote_read_records(caches["sample50"], size["batch"], out / "scratch-remote",
                                                    ratios["kd_sample_step_s"], repeats=3 if quick else 5,
                                                    shard_sequences=None if quick else DEFAULT_SHARD_SEQUENCES)
    quality = quality_records(teacher, caches, common, out / "quality", size["seeds"], size["key_seeds"],
                              size["subset"])
    results["quality_runs"] = [{k: v for k, v in r.items() if k != "final"} for r in quality]
    results["quality"] = summarize_quality(quality) + chain_records(teacher, caches, size, out)
    results["scaling"] = scaling_records(teacher, size, out)
    parallel_common = [c for c in common if not c.startswith("train.steps")] + [f"train.steps={size['parallel_steps']}"]
    results["parallel"] = strategy_records(caches["sample50"], parallel_common, out, rounds=1 if quick else 2)
    results["generation"] = generation_records(random_teacher, out, **size["generation"])
    results["seconds"] = time.time() - started
    write_text(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    write_text(out / "results.md", results_markdown(results))
    return out / "results.md"


def chain_records(teacher: Path, caches: dict, size: dict, out: Path) -> list[dict]:
    """Teacher -> mid -> small against teacher -> small, both scored against the original teacher."""
    mid, small = size["students"]
    direct = train_and_score("chain_direct_small", [f"cache.dir={caches['sample50']}", "train.resume=never",
                                                    f"train.out_dir={out / 'chain-direct'}",
                                                    *_train_common(size, small)], teacher, caches["topk8"])
    middle = train_and_score("chain_mid", [f"cache.dir={caches['sample50']}", "train.resume=never",
                                           f"train.out_dir={out / 'chain-mid'}", *_train_common(size, mid)],
                             teacher, caches["topk8"])
    mid_cache = _cache(Path(middle["final"]), out, size, CACHE_SETTINGS["sample50"])
    chained = train_and_score("chain_mid_to_small", [f"cache.dir={mid_cache}", "train.resume=never",
                                                     f"train.out_dir={out / 'chain-small'}", *_train_common(size, small)],
                              teacher, caches["topk8"])
    return [{k: v for k, v in r.items() if k != "final"} for r in (direct, middle, chained)]


def scaling_records(teacher: Path, size: dict, out: Path) -> list[dict]:
    """Stage-1 and stage-2 seconds per token at x1, x4 and x16 data."""
    records = []
    for factor in (1, 4, 16):
        shutil.rmtree(out / f"scale-{factor}", ignore_errors=True)  # a cache hit would time nothing
        tokens = size["scaling_tokens"] * factor
        start = time.perf_counter()
        cache_dir = _cache(teacher, out / f"scale-{factor}", size, CACHE_SETTINGS["sample50"], max_tokens=tokens)
        stage1 = time.perf_counter() - start
        cached = read_manifest(cache_dir).tokens
        steps = max(2, tokens // (size["batch"] * size["quality_seq"]))
        start = time.perf_counter()
        common = [*_train_common(size, size["students"][1])]
        common = [c for c in common if not c.startswith("train.steps")] + [f"train.steps={steps}"]
        peak_rss_of_training([f"cache.dir={cache_dir}", f"train.out_dir={out / f'scale-{factor}' / 'train'}",
                               "train.resume=never", *common])
        stage2 = time.perf_counter() - start
        trained = steps * size["batch"] * size["quality_seq"]
        records.append({"data_factor": factor, "tokens": cached, "stage1_us_per_token": stage1 / cached * 1e6,
                        "stage2_tokens": trained, "stage2_us_per_token": stage2 / trained * 1e6})
    return records


def results_markdown(results: dict) -> str:
    sections = [
        ("Storage", "storage", ["format", "format_version", "mode", "k", "samples", "logprob_bits", "level",
                                "bytes_per_token", "mean_ids", "bytes_per_entry", "write_mb_per_s", "write_tok_per_s",
                                "read_tok_per_s", "grad_angle_deg", "param_angle_deg"]),
        ("Storage from S3 (moto on loopback; student = stage-2 cached sample KD step)", "storage_remote",
         ["source", "read_tok_per_s", "read_spread", "over_student", "at_least_10x", "student_tok_per_s", "shards",
          "shard_mb", "download_s", "download_mb_per_s", "first_use_extra_s", "cpu", "note"]),
        ("Stage 1", "stage1", ["format", "mode", "width", "chunk_size", "tokens", "cache_tok_per_s",
                               "forward_tok_per_s", "cache_over_forward", "cache_over_forward_spread",
                               "end_to_end_over_forward", "end_to_end_spread",
                               "teacher_s", "other_s", "final_flush_s", "bytes_per_token", "peak_rss_mb"]),
        ("Stage 1 memory (one of 4 parts, shards of 64 sequences)", "stage1_memory",
         ["data_factor", "documents", "tokens", "part_rows", "peak_rss_mb", "rss_over_1x"]),
        ("Stage 2", "stage2", ["kd_topk_over_ce", "kd_sample_over_ce", "online_over_kd_sample", "ce_step_s",
                               "cache_copies", "peak_rss_mb", "data_wait", "startup_wait_s"]),
        ("Quality", "quality", ["student", "seeds", "bytes_per_token", "kl", "kl_spread", "kl_over_online",
                                "kl_over_online_spread", "ppl", "ppl_spread", "top1",
                                "ece"]),
        ("Scaling", "scaling", ["data_factor", "tokens", "stage1_us_per_token", "stage2_tokens", "stage2_us_per_token"]),
        ("Parallel", "parallel", ["strategy", "processes", "grad_accum", "tok_per_s", "tok_per_s_spread", "over_single"]),
        ("Generation (greedy, fp32; product = `distillery generate` end to end, bare = load + `model.generate` loop)",
         "generation", ["rows", "batch", "new_tokens", "batched_tok_per_s", "single_tok_per_s", "batched_over_single",
                        "product_s", "bare_generate_s", "product_over_bare", "product_over_bare_spread"]),
    ]
    parts = [f"# Benchmark results ({results['seconds'] / 60:.1f} min)\n"]
    for title, key, columns in sections:
        parts.append(f"## {title}\n\n{markdown_table(results[key], columns)}\n")
    return "\n".join(parts)
