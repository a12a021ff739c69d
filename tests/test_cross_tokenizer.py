"""Students with another tokenizer than the cache's, end to end: one cache, three students, resume, outputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import cache, cache_args, train, train_args, train_interrupted_at
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.demo.tokenizer import build_tokenizer, build_unigram_tokenizer
from pipeline.models.hf import tokenizer_sha256
from storage import tree_sha256

CROSS = {"loss.alpha": 0.5, "train.steps": 6, "train.checkpoint_every": 3, "train.eval_every": 3}


@pytest.fixture(scope="module")
def unigram_dir(tmp_path_factory):
    return build_unigram_tokenizer(tmp_path_factory.mktemp("u") / "unigram", 600, limit_bytes=100_000)


@pytest.fixture(scope="module")
def small_bpe_dir(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("b") / "bpe700", vocab_size=700, limit_bytes=100_000)


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory, llama_dir, corpus_jsonl):
    return cache(cache_args(llama_dir, corpus_jsonl, tmp_path_factory.mktemp("t") / "c", **{"data.seq_len": 32})).directory


def records(out_dir, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def check_final(final, tokenizer_dir) -> None:
    """``final/`` holds the student's tokenizer, loads with the Auto classes and generates."""
    tokenizer = AutoTokenizer.from_pretrained(str(final))
    assert tokenizer_sha256(tokenizer) == tokenizer_sha256(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    model = AutoModelForCausalLM.from_pretrained(str(final))
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)
    prompt = tokenizer("In the beginning", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4


def test_one_cache_serves_a_same_tokenizer_student_and_two_others_untouched(tmp_path, topk_cache, tokenizer_dir,
                                                                          unigram_dir, small_bpe_dir):
    before = {p.relative_to(topk_cache): tree_sha256(p) for p in topk_cache.rglob("*") if p.is_file()}
    same = train(train_args(topk_cache, tmp_path / "same", **CROSS))
    uld = train(train_args(topk_cache, tmp_path / "uld", **CROSS, **{"student.tokenizer": unigram_dir,
                                                                      "loss.cross_tokenizer": "uld"}))
    gold = train(train_args(topk_cache, tmp_path / "gold", **CROSS, **{"student.tokenizer": small_bpe_dir,
                                                                        "loss.cross_tokenizer": "gold"}))
    after = {p.relative_to(topk_cache): tree_sha256(p) for p in topk_cache.rglob("*") if p.is_file()}
    assert after == before
    check_final(same, tokenizer_dir)
    check_final(uld, unigram_dir)
    check_final(gold, small_bpe_dir)
    for name in ("same", "uld", "gold"):
        last = records(tmp_path / name, "eval")[-1]
        assert 0 < last["bpb"] < 20, (name, last)  # every student gets bits per byte
        assert (last["kl"] is None) == (name != "same")  # KL needs the teacher's vocabulary
    # two students that differ only in their KD loss see the same sequences and diverge only through the loss
    assert records(tmp_path / "uld", "train")[0]["samples_sha256"] == records(tmp_path / "same", "train")[0]["samples_sha256"]


@pytest.fixture(scope="module")
def sample_cache(tmp_path_factory, llama_dir, corpus_jsonl):
    return cache(cache_args(llama_dir, corpus_jsonl, tmp_path_factory.mktemp("s") / "c",
                            **{"data.seq_len": 32, "cache.mode": "sample", "cache.samples": 16,
                               "data.max_tokens": 4096})).directory


@pytest.mark.parametrize("kind", ["uld", "gold"])
def test_a_sample_cache_trains_a_student_of_another_tokenizer(tmp_path, sample_cache, unigram_dir, kind):
    sample = sample_cache
    out = train(train_args(sample, tmp_path / "o", **CROSS, **{"student.tokenizer": unigram_dir,
                                                               "loss.cross_tokenizer": kind}))
    check_final(out, unigram_dir)
    losses = [r["loss"] for r in records(tmp_path / "o", "train")]
    assert all(0 < loss < 50 for loss in losses)


def test_a_cross_tokenizer_run_resumes_bitwise(tmp_path, topk_cache, unigram_dir, monkeypatch):
    settings = {**CROSS, "student.tokenizer": unigram_dir, "loss.cross_tokenizer": "gold", "train.steps": 8,
                "train.checkpoint_every": 2}
    whole = train(train_args(topk_cache, tmp_path / "whole", **settings))
    train_interrupted_at(5, train_args(topk_cache, tmp_path / "resumed", **settings), monkeypatch)
    resumed = train(train_args(topk_cache, tmp_path / "resumed", **settings))
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in records(tmp_path / "resumed", "train")][-3:] == \
        [r["loss"] for r in records(tmp_path / "whole", "train")][-3:]


def test_rounds_change_tokenizer_and_the_next_teacher_keeps_its_own(tmp_path, llama_dir, corpus_jsonl, unigram_dir):
    """Round 1 distils into a Unigram student; round 2's teacher is that student, so its cache speaks Unigram."""
    from pipeline import cli
    from pipeline.config_loading import load_config
    from pipeline.rounds.config import RunJob, previous_final

    student = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
               "num_attention_heads": 2, "num_key_value_heads": 2}
    config = {"run": {"dir": str(tmp_path / "run")}, "teacher": {"model": str(llama_dir)}, "device": "cpu",
              "data": {"path": str(corpus_jsonl), "seq_len": 32, "holdout_fraction": 0.1},
              "cache": {"root": str(tmp_path / "caches"), "mode": "topk", "top_k": 8, "shard_size": 16},
              "train": {"steps": 4, "batch_size": 4, "checkpoint_every": 0, "eval_every": 0, "warmup_steps": 1},
              "loss": {"kind": "forward_kl"},
              "rounds": [{"student": {"config": student, "tokenizer": str(unigram_dir)},
                          "loss": {"cross_tokenizer": "uld", "alpha": 0.5}},
                         {"student": {"config": student}}]}
    (tmp_path / "run.yaml").write_text(json.dumps(config))
    assert cli.main(["run", "--config", str(tmp_path / "run.yaml")]) == 0
    job = load_config(RunJob, tmp_path / "run.yaml", [])
    unigram = tokenizer_sha256(AutoTokenizer.from_pretrained(str(unigram_dir)))
    round_two_cache = json.loads((tmp_path / "run" / "state.json").read_text())["rounds"]["2"]["cache"]["dir"]
    assert json.loads((Path(round_two_cache) / "manifest.json").read_text())["tokenizer"]["sha256"] == unigram
    check_final(previous_final(job, 3), unigram_dir)  # round 2's student: the Unigram tokenizer throughout
    rows = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [r["KL to teacher"] is None for r in rows] == [True, False]
    assert all(r["bits/byte"] > 0 for r in rows)
    assert rows[0]["student tokenizer"] == "unigram" and rows[1]["student tokenizer"] == "the cache's"
