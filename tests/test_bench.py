"""`distillery bench --quick`: the benchmark runs and writes well-formed results (never a timing check)."""
from __future__ import annotations

import json

import pytest

from pipeline import cli

SECTIONS = ("storage", "storage_remote", "stage1", "stage2", "quality", "scaling", "parallel")


@pytest.mark.bench_smoke  # 140 s on a 2-core Xeon, a fifth of make test
def test_quick_bench_writes_every_section(tmp_path, capsys):
    assert cli.main(["bench", "--out", str(tmp_path), "--quick"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for section in SECTIONS:
        records = results[section]
        assert isinstance(records, list) and records, section
        assert all(isinstance(r, dict) and all(not isinstance(v, dict) for v in r.values()) for r in records)
    assert {"bytes_per_token", "write_tok_per_s", "read_tok_per_s", "grad_angle_deg", "param_angle_deg"} <= results["storage"][0].keys()
    assert {"format_version", "logprob_bits", "bytes_per_entry", "write_mb_per_s"} <= results["storage"][0].keys()
    assert {"cache_over_forward", "cache_over_forward_spread", "end_to_end_over_forward"} <= results["stage1"][0].keys()
    assert {"kd_topk_over_ce", "online_over_kd_sample"} <= results["stage2"][0].keys()
    assert [r["data_factor"] for r in results["scaling"]] == [1, 4, 16]
    assert [r["data_factor"] for r in results["stage1_memory"]] == [1, 10] and results["stage1_memory"][-1]["rss_over_1x"] > 0
    assert {r["student"] for r in results["quality"]} >= {"ce_only", "chain_mid_to_small", "chain_direct_small"}
    assert [r["strategy"] for r in results["parallel"]] == ["single", "ddp", "fsdp"]
    assert all(r["tok_per_s"] > 0 for r in results["parallel"]) and results["parallel"][0]["over_single"] == 1.0
    markdown = (tmp_path / "results.md").read_text()
    assert all(f"## {title}" in markdown for title in ("Storage", "Stage 1", "Stage 2", "Quality", "Scaling", "Parallel"))


def test_quality_summary_pairs_runs_by_seed():
    from pipeline.bench.quality import summarize_quality

    def run(student, seed, kl):
        return {"student": student, "seed": seed, "kl": kl, "ppl": 1.0, "top1": 0.5, "ece": 0.0,
                "cache_bytes_per_token": 10.0}

    rows = summarize_quality([run("online_full_kd", 0, 0.2), run("online_full_kd", 1, 0.4),
                              run("sample50", 0, 0.22), run("sample50", 1, 0.4)])
    sample = next(r for r in rows if r["student"] == "sample50")
    assert sample["kl"] == pytest.approx(0.31) and sample["kl_spread"] == pytest.approx(0.18)
    assert sample["kl_over_online"] == pytest.approx(1.05)
    assert sample["kl_over_online_spread"] == pytest.approx([1.0, 1.1])


def test_remote_read_section_sets_local_and_s3_reads_against_the_student(tmp_path, llama_dir, corpus_jsonl,
                                                                         monkeypatch):
    pytest.importorskip("moto")
    import importlib.util
    import os

    from helpers import cache, cache_args

    from pipeline.bench import remote_read
    from storage.manifest import read_manifest

    settings = {"cache.mode": "sample", "cache.samples": 8, "cache.shard_size": 64, "data.max_tokens": 4096}
    directory = cache(cache_args(llama_dir, corpus_jsonl, tmp_path / "cache", **settings)).directory
    student = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
               "num_attention_heads": 2, "num_key_value_heads": 2}
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    records = remote_read.remote_read_records(directory, 4, tmp_path / "scratch", student=student, repeats=3,
                                              shard_sequences=16)  # the copy read has shards of 16 sequences
    assert os.environ.get("AWS_ENDPOINT_URL") == endpoint  # the bench's own server is gone from the environment
    assert [r["source"] for r in records] == ["local", "s3_first_use", "s3_warm"]
    student_rate = records[0]["student_tok_per_s"]
    train = read_manifest(directory).splits["train"]
    assert student_rate > 0 and 0 < records[0]["tokens"] <= train["tokens"]
    assert records[0]["shards"] == -(-train["sequences"] // 16) >= 2
    for r in records:
        assert all(not isinstance(v, dict) for v in r.values()) and r["cpu"] and r["repeats"] == 3
        low, high = r["read_spread"]
        assert 0 < low <= r["read_tok_per_s"] <= high
        assert r["over_student"] == pytest.approx(r["read_tok_per_s"] / student_rate) and r["over_student"] > 0
        assert r["at_least_10x"] == ("yes" if r["over_student"] >= 10 else "no")
    first = records[1]
    assert first["download_s"] > 0 and first["download_mb_per_s"] > 0 and first["upload_mb_per_s"] > 0
    assert 0 < first["bytes_per_token"] <= first["shard_mb"] * 1e6 * first["shards"] / first["tokens"] * (1 + 1e-9)
    assert not (tmp_path / "scratch").exists()  # the local copies of every repetition are deleted

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "moto" else real(name, *a))
    (skipped,) = remote_read.remote_read_records(directory, 4, tmp_path / "scratch", student_step_s=1.0)
    assert "moto is not installed" in skipped["note"]
