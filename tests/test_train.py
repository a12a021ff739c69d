"""End-to-end student training on tiny models: outputs, resume, phases, students, pretrain, online KD, DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import cache, cache_args, train, train_args
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.demo.init_model import build_model
from pipeline.demo.tokenizer import build_tokenizer
from pipeline.errors import ConfigError
from pipeline.train import recipe as train_module


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory, llama_dir, corpus_jsonl):
    return cache(cache_args(llama_dir, corpus_jsonl, tmp_path_factory.mktemp("t") / "c", **{"data.seq_len": 32})).directory


@pytest.fixture(scope="module")
def sample_cache(tmp_path_factory, llama_dir, corpus_jsonl):
    args = cache_args(llama_dir, corpus_jsonl, tmp_path_factory.mktemp("s") / "c",
                      **{"data.seq_len": 32, "cache.mode": "sample", "cache.samples": 16})
    return cache(args).directory


def records(out_dir, kind):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def test_outputs_resume_bitwise_and_final_generates(tmp_path, topk_cache, monkeypatch):
    whole = train(train_args(topk_cache, tmp_path / "whole"))
    assert {p.name for p in (tmp_path / "whole").iterdir()} == {"checkpoints", "config.yaml", "final", "metrics.jsonl"}
    assert [p.name for p in (tmp_path / "whole" / "checkpoints").iterdir()] != []
    assert sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir()) == ["step-00000008", "step-00000012"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in whole.iterdir()}
    evals = records(tmp_path / "whole", "eval")
    assert [r["step"] for r in evals] == [6, 12]
    assert all({"step", "kl", "ppl", "top1", "ece"} <= r.keys() for r in evals)
    trains = records(tmp_path / "whole", "train")
    assert all(0.0 <= r["data_wait"] < 1.0 and r["startup_wait_s"] > 0.0 for r in trains)

    original = train_module.MetricsLog.write

    def crash_at_step_7(self, record):
        if record["step"] == 7:
            raise KeyboardInterrupt("preempted")
        original(self, record)

    monkeypatch.setattr(train_module.MetricsLog, "write", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train(train_args(topk_cache, tmp_path / "resumed"))
    monkeypatch.setattr(train_module.MetricsLog, "write", original)
    assert not (tmp_path / "resumed" / "final").exists()
    resumed = train(train_args(topk_cache, tmp_path / "resumed"))
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [(r["step"], r["kl"]) for r in records(tmp_path / "resumed", "eval")] == [(r["step"], r["kl"]) for r in evals]

    model = AutoModelForCausalLM.from_pretrained(str(whole))
    tokenizer = AutoTokenizer.from_pretrained(str(whole))
    prompt = tokenizer("In the beginning", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5


def test_kd_lowers_held_out_kl(tmp_path, topk_cache):
    out = train(train_args(topk_cache, tmp_path / "o", **{"train.steps": 30, "train.eval_every": 1,
                                                          "train.checkpoint_every": 0, "train.lr": 0.01}))
    kls = [r["kl"] for r in records(out.parent, "eval")]
    assert kls[-1] < kls[0] * 0.8


def test_two_phases_ce_then_kd(tmp_path, topk_cache):
    phases = "[{steps: 3, lr: 0.002, loss: {kind: ce}}, {steps: 4, lr: 0.004}]"
    train(train_args(topk_cache, tmp_path / "o", **{"train.phases": phases, "train.warmup_steps": 1}))
    log = records(tmp_path / "o", "train")
    assert [r["phase"] for r in log] == [0, 0, 0, 1, 1, 1, 1]
    assert log[0]["lr"] > log[2]["lr"] and log[3]["lr"] > log[2]["lr"]  # cosine decays, then the next phase restarts


@pytest.mark.parametrize("tail", ["ground_truth", "renormalize"])
def test_tail_options_and_alpha_train(tmp_path, topk_cache, tail):
    train(train_args(topk_cache, tmp_path / "o", **{"loss.tail": tail, "loss.alpha": 0.5, "train.steps": 3,
                                                     "loss.kind": "jsd", "loss.temperature": 2.0}))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records(tmp_path / "o", "train"))


def test_sample_cache_trains_and_refuses_retempering(tmp_path, sample_cache):
    train(train_args(sample_cache, tmp_path / "o", **{"train.steps": 3}))
    assert records(tmp_path / "o", "eval")
    with pytest.raises(ConfigError, match="cannot be re-tempered"):
        train(train_args(sample_cache, tmp_path / "p", **{"loss.temperature": 2.0}))


def test_online_teacher_reference(tmp_path, topk_cache, llama_dir):
    train(train_args(topk_cache, tmp_path / "o", **{"loss.teacher_live": llama_dir, "train.steps": 3}))
    assert records(tmp_path / "o", "eval")[-1]["kl"] is not None


def test_student_with_other_tokenizer_is_refused(tmp_path, topk_cache, workdir):
    other_tok = build_tokenizer(tmp_path / "tok", vocab_size=400, limit_bytes=50_000)
    other = build_model(other_tok, tmp_path / "other", hidden=16, layers=1, heads=2)
    with pytest.raises(ConfigError, match="differs from the cache's"):
        train(train_args(topk_cache, tmp_path / "o", **{"student.config": "null", "student.model": other}))


def test_padded_student_vocab_trains_and_too_small_is_refused(tmp_path, topk_cache):
    padded = "{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2, vocab_size: 640}"
    final = train(train_args(topk_cache, tmp_path / "o", **{"student.config": padded, "train.steps": 2}))
    assert AutoModelForCausalLM.from_pretrained(str(final)).config.vocab_size == 640
    small = padded.replace("640", "100")
    with pytest.raises(ConfigError, match="vocab size 100 is smaller than the cache's tokenizer"):
        train(train_args(topk_cache, tmp_path / "p", **{"student.config": small}))


def test_student_from_teacher_layers(tmp_path, topk_cache, llama_dir):
    final = train(train_args(topk_cache, tmp_path / "o", **{"student.config": "null", "student.from_teacher": llama_dir,
                                                            "train.steps": 1, "train.lr": 1e-9}))
    student = AutoModelForCausalLM.from_pretrained(str(final))
    teacher = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    assert student.config.num_hidden_layers == 1
    w_s = student.model.layers[0].mlp.up_proj.weight
    w_t = teacher.model.layers[0].mlp.up_proj.weight
    torch.testing.assert_close(w_s, w_t, atol=1e-6, rtol=1e-4)


def test_no_eval_shards_skips_evaluation(tmp_path, llama_dir, corpus_jsonl, capfd):
    directory = cache(cache_args(llama_dir, corpus_jsonl, tmp_path / "c", **{"data.seq_len": 32,
                                                                          "data.holdout_fraction": 0.0})).directory
    train(train_args(directory, tmp_path / "o", **{"train.steps": 2}))
    assert "no eval shards; evaluation is skipped" in capfd.readouterr().err
    assert records(tmp_path / "o", "eval") == []


def test_pretrain_on_raw_text(tmp_path, tokenizer_dir, corpus_jsonl):
    from pipeline.config_loading import load_config
    from pipeline.train.config import PretrainJob
    from pipeline.train.run import pretrain

    student = "{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2}"
    job = load_config(PretrainJob, None, [f"data.path={corpus_jsonl}", "data.seq_len=32", "data.holdout_fraction=0.1",
                                          f"tokenizer={tokenizer_dir}", f"student.config={student}",
                                          f"train.out_dir={tmp_path / 'o'}", "train.steps=20", "train.lr=0.01",
                                          "train.eval_every=10", "device=cpu"])
    final = pretrain(job)
    evals = records(tmp_path / "o", "eval")
    assert evals[-1]["ppl"] < evals[0]["ppl"] and evals[-1]["kl"] is None
    assert (final / "model.safetensors").exists()


def test_ddp_two_processes_gloo(tmp_path, topk_cache):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pipeline.cli",
         "train", *train_args(topk_cache, tmp_path / "o", **{"train.steps": 4, "train.checkpoint_every": 2})],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "o" / "final" / "model.safetensors").exists()
    assert [r["step"] for r in records(tmp_path / "o", "train")] == [1, 2, 3, 4]
