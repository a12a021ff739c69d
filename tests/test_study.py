"""`distillery study --quick`: the study runs every arm, pairs them by seed and writes its outputs (never a result)."""
from __future__ import annotations

import json
import shutil
import threading

import pytest

from pipeline import cli
from pipeline.bench.study import (
    EPOCH_ARMS,
    KEY_ARMS,
    MAIN_ARMS,
    QUICK,
    _quick_teacher,
    help_study,
    planned_runs,
    run_study,
)
from pipeline.bench.study_report import CACHE_COLUMNS, QUALITY_COLUMNS
from storage.io.locks import lock_file, unlock


def header(columns: list[str]) -> str:
    return "| " + " | ".join(columns) + " |"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    assert cli.main(["study", "--out", str(root / "out"), "--quick", "--work", str(root / "work")]) == 0
    return root


def test_quick_study_writes_exactly_its_outputs(quick):
    assert sorted(p.name for p in (quick / "out").iterdir()) == ["gap_vs_steps.png", "kl_vs_bytes.png",
                                                                 "results.json", "results.md"]
    assert all((quick / "out" / name).read_bytes().startswith(b"\x89PNG") for name in ("gap_vs_steps.png", "kl_vs_bytes.png"))
    lines = (quick / "out" / "results.md").read_text().splitlines()
    assert lines.count(header(QUALITY_COLUMNS)) == 2  # the equal-steps table and the epochs table
    assert lines.count(header(CACHE_COLUMNS)) == 1
    assert header(["student", *(f"step {s}" for s in (2, 4))]) in lines
    assert header(["student", "epoch 1", "epoch 2"]) in lines
    assert any(line.startswith("AMD") or "cores" in line for line in lines)


def test_quick_study_pairs_every_arm_by_seed(quick):
    results = json.loads((quick / "out" / "results.json").read_text())
    assert set(results) == {"machine", "quick", "scale", "student", "teachers", "quality", "epochs", "gap_vs_steps",
                            "runs", "seconds"}
    assert results["machine"]["cpu"] and results["machine"]["cores"] >= 1
    (teacher,) = results["teachers"]
    assert [c["cache"] for c in teacher["caches"]] == ["sample50", "sample100", "hybrid8+24", "topk64", "topk64_8bit",
                                                       "sample50_systematic", "few_sample50", "few_sample200"]
    by_name = {c["cache"]: c for c in teacher["caches"]}
    assert all(c["tok_per_s"] > 0 for c in teacher["caches"])  # every cache was built by this call
    assert by_name["topk64"]["mean_unique_ids"] == 64  # every position stores its exact top 64
    assert 1 <= by_name["sample50"]["mean_unique_ids"] <= 50 and by_name["sample50"]["bytes_per_token"] > 0
    assert teacher["cache_pass"]["cache_tok_per_s"] > 0 and 0 < teacher["cache_pass"]["end_to_end_over_forward"]
    seeds = {r["student"]: r["seeds"] for r in results["quality"]}
    assert seeds == {name: QUICK.key_seeds if name in KEY_ARMS else QUICK.seeds
                     for name, _, _ in MAIN_ARMS}
    assert [r["student"] for r in results["epochs"]] == [name for name, _, _ in EPOCH_ARMS]
    for row in results["quality"] + results["epochs"]:
        assert set(QUALITY_COLUMNS) <= row.keys()
        assert (row["bytes_per_token"] is None) == (row["student"].endswith("online_full_kd")
                                                    or row["student"] == "ce_only")
        if row["student"].endswith("online_full_kd"):
            assert row["kl_over_online"] == 1.0
    assert {r["step"] for r in results["gap_vs_steps"]} == {2, 4}
    for run in results["runs"]:
        assert [p["step"] for p in run["steps"]] == [2, 4] and run["kl"] == run["steps"][-1]["kl"] > 0


def test_a_second_call_reuses_the_finished_runs(quick):
    before = json.loads((quick / "out" / "results.json").read_text())["runs"]
    run_study(quick / "again", [], quick=True, work=quick / "work")
    again = json.loads((quick / "again" / "results.json").read_text())
    assert again["runs"] == before
    (first,) = json.loads((quick / "out" / "results.json").read_text())["teachers"]
    (teacher,) = again["teachers"]
    # Every cache is a hit now; each keeps the build time the first call recorded, never the time of the hit.
    assert [c["seconds"] for c in teacher["caches"]] == [c["seconds"] for c in first["caches"]]


def test_a_record_from_another_cache_is_trained_again(quick):
    """A kept record counts only for the cache it was trained on: a changed cache setting never reuses it."""
    (record_path,) = (quick / "work").glob("*/runs/sample50-seed0/record.json")
    stale = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**stale, "cache_fingerprint": "0" * 20, "kl": -1.0}))
    run_study(quick / "stale", [], quick=True, work=quick / "work")
    again = json.loads(record_path.read_text())
    assert again["cache_fingerprint"] == stale["cache_fingerprint"] and again["kl"] > 0
    runs = json.loads((quick / "stale" / "results.json").read_text())["runs"]
    assert all(r["kl"] > 0 for r in runs)


def test_a_helper_trains_unclaimed_runs_and_the_owner_waits_for_claimed_ones(quick):
    """Two processes share the work folder: a helper skips a run another process holds, and the teacher's own
    study waits for that run and reports the record its holder wrote, without training it again."""
    runs = next((quick / "work").glob("*/runs"))
    for name in ("sample50-seed0", "sample100-seed0"):
        shutil.rmtree(runs / name)
    claim = lock_file(runs / ".sample50-seed0.lock")  # another process is training sample50 seed 0
    try:
        assert help_study([_quick_teacher(quick / "work")], quick / "work", quick=True) == len(planned_runs(QUICK)) - 1
        assert (runs / "sample100-seed0" / "record.json").is_file() and not (runs / "sample50-seed0").exists()
        owner = threading.Thread(target=run_study, args=(quick / "owner", []),
                                 kwargs={"quick": True, "work": quick / "work"})
        owner.start()
        other = json.loads((runs / "sample50-seed1" / "record.json").read_text())  # the same cache
        held = {**other, "seed": 0, "kl": 123.0, "steps": [*other["steps"][:-1], {**other["steps"][-1], "kl": 123.0}]}
        (runs / "sample50-seed0").mkdir()
        (runs / "sample50-seed0" / "record.json").write_text(json.dumps(held))
    finally:
        unlock(claim)
    owner.join(timeout=600)
    reported = json.loads((quick / "owner" / "results.json").read_text())["runs"]
    assert [r["kl"] for r in reported if r["student"] == "sample50" and r["seed"] == 0] == [123.0]


@pytest.mark.parametrize("flag", ["--teacher", "--help-with"])
def test_a_missing_teacher_folder_is_one_line_before_any_work(tmp_path, capsys, flag):
    argv = ["-q", "study", "--out", str(tmp_path / "out"), flag, str(tmp_path / "nowhere"),
            "--work", str(tmp_path / "work"), *(["--quick"] if flag == "--help-with" else [])]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nowhere" in err and "no model folder" in err
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


@pytest.mark.bench_smoke  # about 40 s on a 2-core Zen 4 EPYC
def test_quick_on_policy_study_writes_every_arm(tmp_path, llama_dir):
    from pipeline.bench.on_policy_study import ARMS, QUICK, STALENESS_ARM, run_on_policy_study

    results = run_on_policy_study(tmp_path / "out", tmp_path / "work", llama_dir, quick=True, device="cpu")
    assert sorted(p.name for p in results.parent.iterdir()) == ["on_policy.png", "results.json", "results.md"]
    data = json.loads((results.parent / "results.json").read_text())
    assert [row["arm"] for row in data["summary"]] == ["teacher", "student0", *ARMS, STALENESS_ARM]
    assert all(r["reverse_kl_own"] >= 0 and 0 <= r["task_chrf"] <= 1 for r in data["records"])
    assert [len(d) - 2 for d in data["drift"]] == [QUICK.rounds] * QUICK.key_seeds + [1]


@pytest.mark.bench_smoke  # about 25 s on a 2-core Zen 4 EPYC
def test_quick_cross_tokenizer_study_trains_every_arm_from_one_cache(tmp_path, llama_dir):
    from pipeline.bench.cross_tokenizer_study import ARMS, run_cross_tokenizer_study

    results = run_cross_tokenizer_study(tmp_path / "out", tmp_path / "work", llama_dir, quick=True, device="cpu")
    data = json.loads((results.parent / "results.json").read_text())
    assert [(r["tokenizer"], r["loss"]) for r in data["runs"]] == list(ARMS)
    assert all(r["bpb"] > 0 for r in data["runs"])
    assert set(data["goals"]) == {"kjv_bpe/uld", "kjv_bpe/gold", "unigram/uld", "unigram/gold"}
    assert 0 < data["token_role_bytes_per_token"] < 1
    assert [p.name for p in (tmp_path / "work").iterdir() if p.name.startswith("cache")] == ["cache"]  # built once
