"""``distillery study``: distillation quality at realistic length, per teacher, against online KD.

For each teacher: one set of caches of the same KJV sequences (``MAIN_CACHES``: one epoch of the run's steps,
and ``FEW_CACHES``: a quarter of that, so the same steps make ``epochs`` passes over it), then the arms of
``MAIN_ARMS`` and ``EPOCH_ARMS`` for equal steps, seeds paired (a seed fixes the initialisation and the data
order). Every student is scored against the live teacher on one held-out split (``TeacherReference``), at its
end and at ``checkpoints`` evenly spaced steps. A finished run's record is kept in the work folder with the
fingerprint of the cache it trained on, so a second call continues where the first stopped, and a run whose
cache has changed since is trained again. ``study_report`` turns the records into tables and plots.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.bench.quality import (
    CACHE_SETTINGS,
    build_cache,
    train_common,
)
from pipeline.bench.run import STUDENT
from pipeline.bench.stage1 import run_settings
from pipeline.bench.study_report import machine, study_summary, write_outputs
from pipeline.bench.study_runs import run_all
from pipeline.demo.tokenizer import CORPUS
from pipeline.log import get_logger
from pipeline.train.evaluate import TeacherReference
from storage import MANIFEST_NAME, CacheNotFoundError, open_cache, summarize, write_text

CACHE_SECONDS = "cache-seconds.json"
"""Per cache fingerprint, the seconds its build took: a later call that finds the cache still reports them."""

log = get_logger("study")


@dataclass(frozen=True)
class Profile:
    """The size of one teacher's study."""

    seq_len: int
    batch: int
    steps: int = 1000
    eval_tokens: int = 4096
    """Held-out tokens every student is scored on (the teacher's logits on them are kept in memory)."""
    holdout: float = 0.02
    key_seeds: int = 3
    """Seeds of ``KEY_ARMS`` and ``EPOCH_ARMS``; the other arms run ``seeds``."""
    seeds: int = 1
    epoch_seeds: int = 3
    epochs: int = 4
    """Passes over a ``FEW_CACHES`` cache in one run."""
    checkpoints: int = 4

    def scaled(self, factor: float) -> Profile:
        """Fewer (or more) steps, with the data scaled alike: a main run stays one epoch."""
        return dataclasses.replace(self, steps=max(self.checkpoints * self.epochs, round(self.steps * factor)))

    @property
    def epoch_tokens(self) -> int:
        return self.steps * self.batch * self.seq_len


# A 2-core AVX2 CPU (fp32), measured: a student step of 4 x 64 tokens on the 7.6M demo teacher's vocabulary
# (8,192) takes 0.095 s, 0.18 s with that teacher live; on SmolLM2-135M (vocabulary 49,152, 30 layers) a step of
# 1 x 32 tokens takes 0.12 s, 0.33 s live, and caching runs at about 380 tokens/s. See ``estimate_minutes``.
SMALL_TEACHER = Profile(seq_len=64, batch=4)
# Its epoch arms are off (epoch_seeds=0), to keep `make study` within 2 hours: the demo teacher answers the epochs
# question with 3 seeds.
LARGE_TEACHER = Profile(seq_len=32, batch=1, eval_tokens=2048, epoch_seeds=0)
LARGE_TEACHER_PARAMS = 50_000_000
QUICK = Profile(seq_len=32, batch=2, steps=4, eval_tokens=64, holdout=0.1, key_seeds=2, epoch_seeds=1, epochs=2,
                checkpoints=2)
QUICK_STUDENT = {**STUDENT, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                 "num_attention_heads": 2, "num_key_value_heads": 2}

MAIN_CACHES = {**{name: CACHE_SETTINGS[name] for name in ("sample50", "sample100", "hybrid8+24", "topk64", "topk64_8bit")},
               "sample50_systematic": ["cache.mode=sample", "cache.samples=50", "cache.sampler=systematic"]}
FEW_CACHES = {"few_sample50": CACHE_SETTINGS["sample50"],
              "few_sample200": ["cache.mode=sample", "cache.samples=200"]}
ONLINE = "loss.teacher_live={teacher}"
# The top-64 arms use the ground-truth tail, the best top-64 tail in `make bench`.
MAIN_ARMS = [("ce_only", "sample50", ["loss.kind=ce"]), ("online_full_kd", "sample50", [ONLINE]),
             ("sample50", "sample50", []), ("sample50_systematic", "sample50_systematic", []),
             ("sample100", "sample100", []), ("hybrid8+24", "hybrid8+24", []),
             ("topk64_ground_truth", "topk64", ["loss.tail=ground_truth"]),
             ("topk64_8bit_ground_truth", "topk64_8bit", ["loss.tail=ground_truth"])]
KEY_ARMS = ("ce_only", "online_full_kd", "sample50", "sample50_systematic")
# One cache for several epochs: the same 50 draws again, a fresh 50 of 200 stored each epoch, or online KD.
EPOCH_ARMS = [("epochs_sample50_reused", "few_sample50", []),
              ("epochs_sample50_fresh", "few_sample200", ["cache.draws_per_epoch=50"]),
              ("epochs_online_full_kd", "few_sample50", [ONLINE])]


def teacher_facts(teacher: Path) -> dict:
    """Label, parameters and vocabulary of a teacher folder, read without loading its weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (teacher / "config.json").is_file():
        raise CacheNotFoundError(f"study: no model folder at {teacher} (`make study` builds the "
                                 "demo teacher and the real one first: make demo-teacher real-teacher)")
    config = AutoConfig.from_pretrained(str(teacher))
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    label = f"{config.model_type}-{params / 1e6:.1f}M-v{config.vocab_size}"
    return {"teacher": label, "path": str(teacher), "params": params, "vocab": config.vocab_size}


def profile_for(params: int, quick: bool, scale: float) -> Profile:
    if quick:
        return QUICK
    return (LARGE_TEACHER if params >= LARGE_TEACHER_PARAMS else SMALL_TEACHER).scaled(scale)


def build_caches(teacher: Path, work: Path, profile: Profile) -> tuple[dict[str, Path], dict[str, float | None]]:
    """Every cache of one teacher's study and the seconds each took to build. A cache hit (its manifest is older
    than this call) takes the seconds recorded in ``work/CACHE_SECONDS`` by the call that built it, or None."""
    caches, seconds = {}, {}
    timings = work / CACHE_SECONDS
    recorded = json.loads(timings.read_text()) if timings.is_file() else {}
    few_tokens = profile.epoch_tokens // profile.epochs
    for name, extra in [*MAIN_CACHES.items(), *FEW_CACHES.items()]:
        started_at, start = time.time(), time.perf_counter()
        tokens = few_tokens if name in FEW_CACHES else profile.epoch_tokens
        caches[name] = build_cache(teacher, work, profile.seq_len, tokens, extra, profile.holdout, profile.eval_tokens)
        # One second of slack: some file systems keep whole-second mtimes.
        if (caches[name] / MANIFEST_NAME).stat().st_mtime >= started_at - 1:
            recorded[caches[name].name] = time.perf_counter() - start
        seconds[name] = recorded.get(caches[name].name)
    write_text(timings, json.dumps(recorded, indent=2) + "\n")
    return caches, seconds


def cache_facts(caches: dict[str, Path], seconds: dict[str, float | None]) -> list[dict]:
    """Per cache: tokens, build seconds and teacher-pass tokens/s (None when unrecorded), bytes/token, and what the stored
    targets hold per position (distinct ids, top-1 probability, entropy), read from every shard."""
    rows = []
    for name, directory in caches.items():
        stats = summarize(open_cache(directory))
        rows.append({"cache": name, "tokens": stats["tokens"], "seconds": seconds[name],
                     "tok_per_s": stats["tokens"] / seconds[name] if seconds[name] else None,
                     **{k: stats[k] for k in ("bytes_per_token", "mean_unique_ids", "mean_top1_prob",
                                              "mean_entropy_nats")}})
    return rows


def forward_ratio(teacher: Path, work: Path, quick: bool) -> dict:
    """The cache pass against the teacher's bare forward on the same batches, interleaved in one process
    (``pipeline.bench.stage1``): a sample-50 cache of 8,192 KJV tokens in sequences of 128."""
    tokens, seq_len = (2048, 32) if quick else (8192, 128)  # at least 3 batches of cache.batch_size
    overrides = [f"teacher.model={teacher}", "teacher.dtype=auto", f"data.path={CORPUS}", f"data.seq_len={seq_len}",
                 f"data.max_tokens={tokens}", f"cache.dir={work / 'stage1-scratch'}", "cache.shard_size=16",
                 "cache.mode=sample", "cache.samples=50", "device=cpu"]
    record = run_settings([overrides])[0]
    return {k: record[k] for k in ("dtype", "tokens", "cache_tok_per_s", "forward_tok_per_s", "cache_over_forward",
                                   "end_to_end_over_forward", "end_to_end_spread", "bytes_per_token")}


def planned_runs(profile: Profile) -> list[tuple[str, str, list[str], int]]:
    """(name, cache name, overrides, seed) of every run of one teacher's study, seed by seed."""
    planned = []
    for arms, key_seeds in ((MAIN_ARMS, profile.key_seeds), (EPOCH_ARMS, profile.epoch_seeds)):
        for seed in range(max(key_seeds, profile.seeds)):
            planned += [(name, cache_name, extra, seed) for name, cache_name, extra in arms
                        if seed < (key_seeds if name in KEY_ARMS or arms is EPOCH_ARMS else profile.seeds)]
    return planned


def teacher_context(teacher: Path, work: Path, profile: Profile, student: dict, label: str) -> dict:
    """What every run of one teacher needs: its caches (built or found), their build seconds, the held-out
    reference and the shared training overrides."""
    work = work / label
    caches, cache_seconds = build_caches(teacher, work, profile)
    common = train_common(student, profile.steps, profile.batch, warmup=max(1, profile.steps // 20), eval_batches=1,
                          log_every=max(1, profile.steps // 20), checkpoints=profile.checkpoints)
    return {"work": work, "teacher": teacher, "label": label, "profile": profile, "caches": caches,
            "cache_seconds": cache_seconds, "reference": TeacherReference(teacher, caches["sample50"]), "common": common}


def study_teacher(teacher: Path, work: Path, profile: Profile, student: dict, facts: dict) -> tuple[dict, list]:
    """One teacher's caches and runs (waiting for any that another process is training): its facts (with
    timings) and the run records."""
    started = time.perf_counter()
    context = teacher_context(teacher, work, profile, student, facts["teacher"])
    records = run_all(planned_runs(profile), context["caches"], context, wait=True)
    facts = {**facts, "profile": dataclasses.asdict(profile), "key_arms": list(KEY_ARMS),
             "eval_tokens": context["reference"].tokens,
             "caches": cache_facts(context["caches"], context["cache_seconds"]),
             "cache_pass": forward_ratio(teacher, context["work"], profile is QUICK),
             "seconds": time.perf_counter() - started}
    return facts, records


def help_study(teachers: list[str | Path], work: str | Path, quick: bool = False, scale: float = 1.0) -> int:
    """Train the runs of other teachers' studies that no process has claimed (``--help-with``); their own
    ``distillery study`` processes report them. Returns how many runs this call trained or found finished."""
    done = 0
    for path in [Path(t).resolve() for t in teachers]:
        facts = teacher_facts(path)
        profile = profile_for(facts["params"], quick, scale)
        context = teacher_context(path, Path(work).resolve(), profile, QUICK_STUDENT if quick else STUDENT,
                                  facts["teacher"])
        planned = planned_runs(profile)
        finished = len(run_all(planned, context["caches"], context, wait=False))
        log.info(f"helped with {facts['teacher']}: {finished} of its {len(planned)} runs are finished; "
                 "its own `distillery study` waits for the rest and reports them all")
        done += finished
    return done


def default_work(out: str | Path) -> Path:
    """The work folder of a study whose ``--work`` is not given: ``<out>-work`` beside ``out``."""
    out = Path(out).resolve()
    return out.with_name(f"{out.name}-work")


def run_study(out: str | Path, teachers: list[str | Path], quick: bool = False, scale: float = 1.0,
              work: str | Path | None = None) -> Path:
    """Run the study for each teacher; write ``results.json``, ``results.md`` and the plots into ``out``.

    Caches and runs go under ``work`` (default: the folder ``<out>-work`` beside ``out``), never into ``out``.
    ``quick`` without teachers builds a tiny random one: a smoke test of the study itself, never a result.
    """
    out = Path(out).resolve()
    work = Path(work).resolve() if work else default_work(out)
    paths = [Path(t).resolve() for t in teachers] or ([_quick_teacher(work)] if quick else [])
    if not paths:
        raise CacheNotFoundError("study: give at least one --teacher folder (or --quick)")
    all_facts = [teacher_facts(p) for p in paths]  # every folder is checked before any work
    started, teachers_out, records = time.time(), [], []
    student = QUICK_STUDENT if quick else STUDENT
    for path, facts in zip(paths, all_facts, strict=True):
        facts, runs = study_teacher(path, work, profile_for(facts["params"], quick, scale), student, facts)
        teachers_out.append(facts)
        records += runs
    results = {"machine": machine(), "quick": quick, "scale": scale, "student": student, "teachers": teachers_out,
               **study_summary(records), "runs": records, "seconds": time.time() - started}
    return write_outputs(out, results)


def _quick_teacher(work: Path) -> Path:
    from pipeline.demo.init_model import build_model
    from pipeline.demo.tokenizer import build_tokenizer

    tokenizer = work / "tokenizer-512"
    if not tokenizer.exists():
        build_tokenizer(tokenizer, vocab_size=512)
    teacher = work / "quick-teacher"
    return teacher if (teacher / "config.json").exists() else build_model(tokenizer, teacher, hidden=32, layers=1,
                                                                          heads=2)
