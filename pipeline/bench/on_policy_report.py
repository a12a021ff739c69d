"""Scores, tables and plots of ``distillery study-on-policy``.

Every student is measured alike, on the held-out prompts of the recitations:
- the task score of its greedy answers (exact match, chrF);
- the reverse KL(student || teacher) per token on its own samples (temperature 1), over the full vocabulary:
  the on-policy measure (``pipeline.generate.task``);
- the held-out KL(teacher || student) on the reference conversations (the references cache's eval split).
Teacher tokens count the positions the teacher computed for the arm: its caches' tokens, the tokens it
generated, or, online, the positions it scored. Teacher seconds are what the generations and caches an arm uses took to
build, whichever run built them (they are shared by the seeds, and by the SFT and KD arms on the same data). The staleness of each staged round is the drift of the round's
final student from the policy that wrote the round's samples (``policy_drift``).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.bench.run import markdown_table
from pipeline.bench.study_report import machine
from pipeline.config_loading import build_config
from pipeline.data.config import DataConfig
from pipeline.generate.task import answer_score, held_out_prompts, own_sample_reverse_kl, policy_drift
from pipeline.log import get_logger
from pipeline.train.evaluate import score_against_teacher
from storage import atomic_write, read_folder_manifest, read_manifest, write_text

log = get_logger("study")
DRIFT_ROWS = 64
"""Rows of each staged round's generations on which its drift is measured."""


def _load(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _rows(generations: Path, limit: int) -> list[dict]:
    _, shards = read_folder_manifest(generations)
    rows: list[dict] = []
    for shard in shards:
        rows += pq.read_table(generations / shard.path).to_pylist()
        if len(rows) >= limit:
            break
    return rows[:limit]


def _build_seconds(runs: list[dict]) -> dict[str, float]:
    """The seconds each generation and cache folder took, from the run that wrote it (the others hit it)."""
    seconds = {}
    for run in runs:
        for record in run.get("rounds", {}).values():
            for stage in (record.get("generate"), record["cache"]):
                if stage and not stage.get("hit"):
                    seconds[stage["dir"]] = stage.get("seconds", 0.0)
    return seconds


def _costs(run: dict, built: dict[str, float]) -> dict:
    """The teacher tokens of one arm's run; the seconds of its student (training, and its own generations) and of
    its teacher (the generations and caches it uses, as long as they took to build; online, it works inside
    training)."""
    if "train_dir" in run:  # online: the positions the live teacher scored
        records = [json.loads(line) for line in (Path(run["train_dir"]) / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in records if r["type"] == "train"][-1]
        return {"teacher_tokens": last["tokens"], "student_s": last["elapsed_s"], "teacher_s": None}
    tokens, student_s, teacher_s = 0, 0.0, 0.0
    sft = run["arm"].startswith("sft")
    for record in run["rounds"].values():
        student_s += record["train"].get("seconds", 0.0)
        generate = record.get("generate")
        if generate and generate.get("by") == "teacher":
            tokens += read_folder_manifest(Path(generate["dir"]))[0]["tokens"]
            teacher_s += built.get(generate["dir"], 0.0)
        elif generate:
            student_s += generate.get("seconds", 0.0)
        if not sft:
            tokens += read_manifest(record["cache"]["dir"]).tokens
            teacher_s += built.get(record["cache"]["dir"], 0.0)
    return {"teacher_tokens": tokens, "student_s": student_s, "teacher_s": teacher_s}


def _drift(run: dict, rows: int) -> list[float]:
    """Each staged round's final student against the policy that wrote its samples."""
    drifts = []
    for _, record in sorted(run["rounds"].items(), key=lambda item: int(item[0])):
        model, _ = _load(record["train"]["final"])
        drifts.append(policy_drift(model, _rows(Path(record["generate"]["dir"]), rows)))
    return drifts


def _measures(student, tokenizer, teacher, prompts, context: dict) -> dict:
    p = context["profile"]
    task = answer_score(student, tokenizer, prompts, p.max_new_tokens) or {}
    return {"task_exact": task.get("exact_match"), "task_chrf": task.get("chrf"),
            "reverse_kl_own": own_sample_reverse_kl(student, teacher, tokenizer, prompts, p.max_new_tokens, seed=1234)}


def score_students(runs: list[dict], context: dict) -> list[dict]:
    """One record per run, plus the starting student and the teacher as reference rows."""
    teacher, tokenizer = _load(str(context["teacher"]))
    prompts = held_out_prompts(build_config(DataConfig, context["data"]), tokenizer, context["profile"].eval_prompts)
    references = context["references_cache"]
    built = _build_seconds(runs)
    records = []
    for name, path in (("teacher", context["teacher"]), ("student0", context["student0"])):
        model, _ = _load(str(path))
        kl = score_against_teacher(Path(path), context["teacher"], references)["kl"]
        records.append({"arm": name, "seed": 0, **_measures(model, tokenizer, teacher, prompts, context),
                        "heldout_kl": kl, "teacher_tokens": None, "student_s": None, "teacher_s": None})
    for run in runs:
        kept = Path(run["run_dir"]) / "scores.json"
        if kept.is_file() and json.loads(kept.read_text())["final"] == run["final"]:
            records.append(json.loads(kept.read_text())["record"])  # a rerun scores only new runs
            continue
        model, _ = _load(run["final"])
        record = {"arm": run["arm"], "seed": run["seed"], **_measures(model, tokenizer, teacher, prompts, context),
                  "heldout_kl": score_against_teacher(Path(run["final"]), context["teacher"], references)["kl"],
                  **_costs(run, built)}
        if run["arm"].startswith("staged_on_policy"):
            record["drift_per_round"] = _drift(run, DRIFT_ROWS)
        log.info(f"scored {run['arm']} seed {run['seed']}: {record}")
        write_text(kept, json.dumps({"final": run["final"], "record": record}, indent=2) + "\n")
        records.append(record)
    return records


MEASURES = ("task_exact", "task_chrf", "reverse_kl_own", "heldout_kl", "teacher_tokens", "student_s", "teacher_s")


def summary(records: list[dict]) -> list[dict]:
    """Per arm, in order of first appearance: the seeds, and the median and spread (max - min) of each measure."""
    rows = []
    for arm in dict.fromkeys(r["arm"] for r in records):
        mine = [r for r in records if r["arm"] == arm]
        row = {"arm": arm, "seeds": len(mine)}
        for key in MEASURES:
            values = [r[key] for r in mine if r[key] is not None]
            row[key] = statistics.median(values) if values else None
            if key in ("task_chrf", "reverse_kl_own") and len(values) > 1:
                row[f"{key}_spread"] = max(values) - min(values)
        rows.append(row)
    return rows


def _plot(out: Path, records: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["arm"] for r in records if r["arm"] != "teacher"))
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for axis, key, label in ((axes[0], "task_chrf", "held-out task chrF (higher is better)"),
                             (axes[1], "reverse_kl_own", "reverse KL on own samples (lower is better)")):
        for x, arm in enumerate(arms):
            values = [r[key] for r in records if r["arm"] == arm]
            axis.bar(x, statistics.median(values), color="tab:orange" if "on_policy" in arm else "tab:blue")
            axis.scatter([x] * len(values), values, color="black", s=10, zorder=3)
        teacher = [r[key] for r in records if r["arm"] == "teacher"]
        if teacher and key == "task_chrf":
            axis.axhline(teacher[0], linestyle="--", color="grey", label="teacher")
            axis.legend(fontsize=7)
        axis.set_xticks(range(len(arms)), [a.replace("_", "\n") for a in arms], fontsize=7)
        axis.set_title(label, fontsize=9)
    name = "on_policy.png"
    with atomic_write(out / name) as tmp:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return name


def write_outputs(out: Path, records: list[dict], context: dict) -> Path:
    """``results.json``, ``results.md`` and the plot; return ``results.md``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = summary(records)
    drift = [{"arm": r["arm"], "seed": r["seed"], **{f"round {i + 1}": d for i, d in enumerate(r["drift_per_round"])}}
             for r in records if "drift_per_round" in r]
    plot = _plot(out, records)
    p = context["profile"]
    results = {"machine": machine(), "profile": {k: v for k, v in vars(p).items() if k != "student"},
               "summary": rows, "drift": drift, "records": records}
    write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    lines = [f"# On-policy study ({results['machine']['cpu']}, {results['machine']['cores']} cores, torch "
             f"{results['machine']['torch']})", "",
             f"{p.steps} student steps per arm, batch {p.batch}; staged on-policy: {p.rounds} rounds of "
             f"{p.steps // p.rounds} steps on {p.prompts_per_round} fresh prompts each; {p.eval_prompts} held-out "
             "prompts. Medians over seeds; spread = max - min.", "",
             markdown_table(rows, ["arm", "seeds", *MEASURES, "task_chrf_spread", "reverse_kl_own_spread"]), "",
             "### Staleness: drift of each round's final student from the policy that wrote the round's samples "
             "(per-token KL estimate, nats)", "", markdown_table(drift, ["arm", "seed", *(f"round {i + 1}" for i in range(p.rounds))]), "",
             "teacher_s counts the generations and caches that this study's runs built, each once per arm that uses "
             "it; a folder reused from an earlier call of the study (a hit) counts 0.", "",
             f"![arms]({plot})", ""]
    write_text(out / "results.md", "\n".join(lines))
    return out / "results.md"
