"""``distillery study-on-policy``: does staged on-policy distillation correct the student's errors?

The task is the shipped verse recitations (``kjv_qa``: "Recite Ge 1:13."), scored on held-out prompts by exact
match and chrF against the reference verse. The teacher is the demo teacher fine-tuned on the recitations'
training split. Every student starts from one small model pretrained on the KJV text (``student0``), and every
arm trains it for the same number of optimizer steps with the same batch:

1. ``sft_references``: cross-entropy on the reference answers;
2. ``kd_references``: KD from a cache of the teacher on the reference conversations;
3. ``sft_teacher_generations``: cross-entropy on the teacher's own answers (sampled, temperature 1);
4. ``kd_teacher_generations``: KD from a cache of the teacher on those answers;
5. ``staged_on_policy``: ``on_policy`` rounds; each round the student writes, the teacher's cache scores it;
6. ``online_on_policy``: ``online`` in ``distillery train``; the student samples and a live teacher scores, every step.

``staged_on_policy_1_round`` measures the staleness that short rounds avoid: one round, in which the starting
student writes all the prompts of the K rounds at once and then trains for all the steps (one seed).

The KD arms share one divergence (``LOSS``) and one cache setting (``CACHE``). Every run is a ``distillery run`` (or a
``distillery train`` for the online arm) in the work folder, so a rerun skips what is complete, and caches and
generations that do not depend on the seed are built once and hit by the other seeds.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.bench.on_policy_report import score_students, write_outputs
from pipeline.bench.run import STUDENT
from pipeline.config_loading import build_config
from pipeline.demo.tokenizer import CORPUS, QA_CORPUS
from pipeline.log import get_logger
from pipeline.rounds.config import RunJob
from pipeline.rounds.run import run_pipeline
from pipeline.train.config import PretrainJob, TrainJob
from pipeline.train.run import pretrain, train_from_cache

log = get_logger("study")

ARMS = ("sft_references", "kd_references", "sft_teacher_generations", "kd_teacher_generations", "staged_on_policy",
        "online_on_policy")
KEY_ARMS = ("kd_references", "kd_teacher_generations", "staged_on_policy", "online_on_policy")
STALENESS_ARM = "staged_on_policy_1_round"
LOSS = "forward_kl"
"""One divergence for every KD arm, so that the arms differ by their data alone. Forward KL on a sample cache is
unbiased; reverse KL on a top-32 cache, the first choice, let the student spread the tail bucket's mass anywhere
(see the first run in docs/quality.md, on-policy study)."""
CACHE = {"mode": "sample", "samples": 50}


@dataclass(frozen=True)
class Profile:
    steps: int = 150
    """Optimizer steps of every arm (split evenly over the on-policy rounds)."""
    batch: int = 16
    rounds: int = 3
    prompts_per_round: int = 800
    max_new_tokens: int = 48
    eval_prompts: int = 64
    """Held-out prompts every student answers (greedy, for the task score) and samples (for the reverse KL)."""
    key_seeds: int = 3
    seeds: int = 3
    """Seeds of the arms outside ``KEY_ARMS``."""
    teacher_steps: int = 300
    """Fine-tuning steps of the teacher on the recitations."""
    student_steps: int = 200
    """Pretraining steps of ``student0`` on the KJV text."""
    student: tuple = tuple(STUDENT.items())


FULL = Profile()
QUICK = Profile(steps=4, batch=2, rounds=2, prompts_per_round=8, max_new_tokens=6, eval_prompts=3, key_seeds=1,
                teacher_steps=2, student_steps=2,
                student=tuple({**STUDENT, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "num_key_value_heads": 2}.items()))


def data_settings(quick: bool) -> dict:
    """The recitations as chat; the held-out 5 % are never trained on, by any arm or stage."""
    return {"path": str(QA_CORPUS), "format": "chat", "seq_len": 64 if quick else 128, "holdout_fraction": 0.05,
            "eval_max_tokens": 512 if quick else 4096, **({"max_tokens": 2048} if quick else {})}


def _pretrain(out: Path, data: dict, model: dict, steps: int, batch: int, lr: float, device: str) -> Path:
    """A model trained with CE on ``data``, kept: a second call finds its ``final/`` and trains nothing (without
    checkpoints, ``distillery pretrain`` itself would start over)."""
    if (out / "final" / "config.json").is_file():
        return out / "final"
    job = build_config(PretrainJob, {"data": data, "tokenizer": model.pop("tokenizer"), "student": model,
                                     "train": {"out_dir": str(out), "steps": steps, "batch_size": batch, "lr": lr,
                                               "warmup_steps": min(20, steps // 4), "eval_every": 0,
                                               "checkpoint_every": 0},
                                     "device": device})
    return Path(pretrain(job))


def prepare(work: Path, base_teacher: Path, profile: Profile, quick: bool, device: str) -> tuple[Path, Path]:
    """The fine-tuned teacher and the starting student."""
    teacher = _pretrain(work / "teacher", data_settings(quick), {"model": str(base_teacher),
                        "tokenizer": str(base_teacher)}, profile.teacher_steps, 16, 5e-4, device)
    text = {"path": str(CORPUS), "seq_len": 128, "holdout_fraction": 0.02, **({"max_tokens": 4096} if quick else {})}
    student = _pretrain(work / "student0", text, {"config": dict(profile.student), "tokenizer": str(base_teacher)},
                        profile.student_steps, 16, 3e-3, device)
    return teacher, student


def _run_config(name: str, seed: int, context: dict) -> dict:
    """The ``distillery run`` config of one arm and seed."""
    p, start = context["profile"], {"model": str(context["student0"])}
    generate = {"max_new_tokens": p.max_new_tokens, "temperature": 1.0, "batch_size": 32}
    config = {"run": {"dir": str(context["work"] / "runs" / f"{name}-seed{seed}")},
              "teacher": {"model": str(context["teacher"])}, "data": data_settings(context["quick"]),
              "cache": {"root": str(context["work"] / "caches"), **CACHE, "shard_size": 64},
              "train": {"steps": p.steps, "batch_size": p.batch, "lr": 1e-3, "warmup_steps": 10, "eval_every": 0,
                        "checkpoint_every": 0, "log_every": 5, "seed": seed},
              "loss": {"kind": LOSS}, "device": context["device"]}
    ce = {"loss": {"kind": "ce"}} if name.startswith("sft") else {}
    if name.endswith("references"):
        config["rounds"] = [{"student": start, **ce}]
    elif name.endswith("teacher_generations"):  # one generation (seed 0) for every student seed: the teacher's data
        shared = str(context["work"] / "generations" / "teacher")
        config["rounds"] = [{"student": start, "generate": {**generate, "by": "teacher", "seed": 0, "out_dir": shared},
                             **ce}]
    else:
        rounds = 1 if name == STALENESS_ARM else p.rounds
        config["on_policy"] = {"rounds": rounds, "prompts_per_round": p.prompts_per_round * p.rounds // rounds,
                               "student": start, "generate": {**generate, "seed": seed},
                               "train": {"steps": p.steps // rounds}}
    return config


def run_arm(name: str, seed: int, context: dict) -> dict:
    """Train one arm for one seed (or find it complete); return where its student is and what it cost."""
    if name == "online_on_policy":
        return _online(seed, context)
    config = _run_config(name, seed, context)
    job = build_config(RunJob, config)
    run_dir = Path(run_pipeline(job))
    state = json.loads((run_dir / "state.json").read_text())["rounds"]
    last = state[str(job.round_count())]
    return {"arm": name, "seed": seed, "final": last["train"]["final"], "run_dir": str(run_dir), "rounds": state}


def _online(seed: int, context: dict) -> dict:
    """The online arm trains with ``distillery train``; the references' cache serves its held-out evaluation."""
    p = context["profile"]
    out = context["work"] / "runs" / f"online_on_policy-seed{seed}" / "train"
    job = build_config(TrainJob, {
        "cache": {"dir": context["references_cache"]}, "student": {"model": str(context["student0"])},
        "train": {"out_dir": str(out), "steps": p.steps, "batch_size": p.batch, "lr": 1e-3, "warmup_steps": 10,
                  "eval_every": 0, "checkpoint_every": 25, "log_every": 5, "seed": seed},
        "loss": {"kind": LOSS, "teacher_live": str(context["teacher"])},
        "online": {"prompts": data_settings(context["quick"]), "max_new_tokens": p.max_new_tokens},
        "device": context["device"]})
    start = time.perf_counter()
    final = train_from_cache(job)
    return {"arm": "online_on_policy", "seed": seed, "final": str(final), "run_dir": str(out.parent),
            "train_dir": str(out), "seconds_this_call": time.perf_counter() - start}


def run_on_policy_study(out: Path, work: Path, base_teacher: Path, quick: bool = False, device: str = "auto") -> Path:
    """Every arm and seed, then the scores, tables and plots in ``out``; return ``results.md``."""
    profile = QUICK if quick else FULL
    work.mkdir(parents=True, exist_ok=True)
    teacher, student0 = prepare(work, base_teacher, profile, quick, device)
    context = {"profile": profile, "work": work, "teacher": teacher, "student0": student0, "quick": quick,
               "device": device, "data": data_settings(quick)}
    runs = []
    for seed in range(profile.key_seeds):
        for name in ARMS:
            if seed < profile.seeds or name in KEY_ARMS:
                log.info(f"==== on-policy study: {name}, seed {seed} ====")
                runs.append(run_arm(name, seed, context))
                if name == "kd_references":
                    context["references_cache"] = runs[-1]["rounds"]["1"]["cache"]["dir"]
    runs.append(run_arm(STALENESS_ARM, 0, context))
    records = score_students(runs, context)
    return write_outputs(out, records, context)
