"""End-to-end student training on tiny models: outputs, resume, phases, students, pretrain, online KD."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from helpers import STUDENT, cache, cache_args, train, train_args, train_interrupted_at
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.demo.init_model import build_model
from pipeline.demo.tokenizer import build_tokenizer
from pipeline.errors import ConfigError
from pipeline.train.config import StudentConfig
from pipeline.train.student import build_student
from storage.manifest import read_manifest
from storage.read.reader import SoftTargetStream
from storage.read.stream import StreamOrder


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


def start_of_training(cache_dir, student_config=STUDENT):
    """The student a ``train_args`` run starts from (built from ``student.seed`` 0), the first batch it trains
    on (``train.batch_size`` 4, ``train.seed`` 0, one rank) and the cache's real vocabulary size."""
    manifest = read_manifest(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(cache_dir / manifest.tokenizer_dir))
    config = StudentConfig(config=yaml.safe_load(student_config))
    student = build_student(config, manifest.vocab_size, tokenizer).eval()
    batch = next(iter(SoftTargetStream(cache_dir, StreamOrder(batch_size=4, seed=0))))
    return student, batch, manifest.tokenizer_length


def masked_mean(values, mask):
    return float((values * mask).sum() / mask.sum())


def test_outputs_resume_bitwise_and_final_generates(tmp_path, topk_cache, monkeypatch):
    whole = train(train_args(topk_cache, tmp_path / "whole"))
    assert {p.name for p in (tmp_path / "whole").iterdir()} == {".lock", "checkpoints", "config.yaml", "final", "metrics.jsonl"}
    assert [p.name for p in (tmp_path / "whole" / "checkpoints").iterdir()] != []
    assert sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir()) == ["step-00000008", "step-00000012"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in whole.iterdir()}
    evals = records(tmp_path / "whole", "eval")
    assert [r["step"] for r in evals] == [6, 12]
    assert all({"step", "kl", "ppl", "top1", "ece"} <= r.keys() for r in evals)
    trains = records(tmp_path / "whole", "train")
    assert all(0.0 <= r["data_wait"] < 1.0 and r["startup_wait_s"] > 0.0 for r in trains)

    train_interrupted_at(7, train_args(topk_cache, tmp_path / "resumed"), monkeypatch)
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


def test_tied_weights_checkpoint_and_resume_bitwise(tmp_path, topk_cache, monkeypatch):
    """A GPT-2 student shares its embedding with its head: the checkpoint saves it once and restores both. Its
    dropout also makes the resume depend on restoring the RNG after everything else that draws from it."""
    tied = "{model_type: gpt2, n_embd: 32, n_layer: 1, n_head: 2, tie_word_embeddings: true}"  # with GPT-2's dropout
    settings = {"student.config": tied, "train.steps": 4, "train.checkpoint_every": 2, "train.eval_every": 0}
    whole = train(train_args(topk_cache, tmp_path / "whole", **settings))
    train_interrupted_at(3, train_args(topk_cache, tmp_path / "resumed", **settings), monkeypatch)
    resumed = train(train_args(topk_cache, tmp_path / "resumed", **settings))
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_what_a_kill_leaves_behind_is_cleared_on_resume(tmp_path, topk_cache, monkeypatch):
    train_interrupted_at(7, train_args(topk_cache, tmp_path / "o"), monkeypatch)
    with open(tmp_path / "o" / "metrics.jsonl", "a") as handle:
        handle.write('{"type": "train", "step": 7, "lo')  # kill -9 in the middle of an append
    (tmp_path / "o" / ".final.tmp-999-dead").mkdir()  # and in the middle of writes of final/ and a checkpoint
    (tmp_path / "o" / "checkpoints" / ".step-00000008.tmp-999-dead").mkdir()
    train(train_args(topk_cache, tmp_path / "o"))
    assert [r["step"] for r in records(tmp_path / "o", "train")] == list(range(1, 13))
    assert not [p for p in (tmp_path / "o").rglob(".*") if ".tmp-" in p.name]


def test_changed_settings_do_not_resume_silently(tmp_path, topk_cache):
    """A rerun into the same out_dir with another loss and LR is refused with the changed keys; changing only
    how the run is logged or read resumes."""
    settings = {"train.steps": 4, "train.checkpoint_every": 2, "train.eval_every": 0}
    train(train_args(topk_cache, tmp_path / "o", **settings))
    with pytest.raises(ConfigError, match=r'loss.kind: "forward_kl" -> "jsd"; train.lr: 0.001 -> 0.002\); '
                                          "resuming would mix two configurations"):
        train(train_args(topk_cache, tmp_path / "o", **settings, **{"loss.kind": "jsd", "train.lr": 0.002}))
    harmless = {"train.log_every": 3, "train.num_workers": 1, "train.eval_batches": 2}
    assert train(train_args(topk_cache, tmp_path / "o", **settings, **harmless)) == tmp_path / "o" / "final"
    fresh = train(train_args(topk_cache, tmp_path / "o", **settings, **{"train.lr": 0.002, "train.resume": "never"}))
    assert (fresh / "model.safetensors").is_file()


def test_keys_added_since_a_checkpoint_resume_when_left_unset():
    """A checkpoint written before ``student.lora`` existed resumes with it unset, but not with it set."""
    from pipeline.train.resume import changed_settings

    before = {"train.lr": "0.001"}
    assert changed_settings(before, {**before, "student.lora": "null"}) == ""
    assert changed_settings(before, {**before, "student.lora.r": "8"}) == "student.lora.r: unset -> 8"


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


def test_tail_options_and_alpha_set_the_loss(tmp_path, topk_cache):
    """Step-1 losses on the same batch from the same student: each tail option gives its own value, the
    renormalised JSD at T=2 matches a hand computation, and alpha=1 is exactly the CE objective."""

    def first_loss(name, **extra):
        train(train_args(topk_cache, tmp_path / name, **{"train.steps": 1, **extra}))
        return records(tmp_path / name, "train")[0]["loss"]

    jsd = {"loss.kind": "jsd", "loss.alpha": 0.5, "loss.temperature": 2.0, "loss.beta": 0.5}
    tails = {tail: first_loss(tail, **jsd, **{"loss.tail": tail}) for tail in ("bucket", "ground_truth", "renormalize")}
    ce = first_loss("ce", **{"loss.kind": "ce"})
    assert first_loss("alpha1", **{"loss.kind": "jsd", "loss.alpha": 1.0}) == ce
    values = sorted(tails.values())
    assert values[1] - values[0] > 1e-2 and values[2] - values[1] > 1e-2, tails

    student, batch, _ = start_of_training(topk_cache)
    with torch.no_grad():
        logits = student(batch["input_ids"]).logits.float()
    ids, mask = batch["input_ids"], batch["loss_mask"]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    assert ce == pytest.approx(masked_mean(nll, mask[:, :-1]), rel=1e-5)
    # renormalize: both distributions restricted to the 8 stored ids; re-tempering the teacher to T=2 halves its
    # cached log-probs; GKD JSD with beta=0.5 against the mixture, scaled by T^2.
    p = torch.log_softmax(batch["topk_logprobs"] / 2.0, -1)
    q = torch.log_softmax(logits.gather(-1, batch["topk_ids"]) / 2.0, -1)
    m = torch.logaddexp(p, q) - math.log(2.0)
    divergence = 0.5 * (p.exp() * (p - m)).sum(-1) + 0.5 * (q.exp() * (q - m)).sum(-1)
    kd = (tails["renormalize"] - 0.5 * ce) / 0.5
    assert kd == pytest.approx(masked_mean(divergence * 4.0, mask), rel=1e-2)


def test_sample_cache_trains_and_refuses_retempering(tmp_path, sample_cache):
    train(train_args(sample_cache, tmp_path / "o", **{"train.steps": 3}))
    assert records(tmp_path / "o", "eval")
    with pytest.raises(ConfigError, match="cannot be re-tempered"):
        train(train_args(sample_cache, tmp_path / "p", **{"loss.temperature": 2.0}))


def test_online_teacher_reference(tmp_path, topk_cache, llama_dir):
    """With loss.teacher_live the loss is the full-vocabulary KL to that teacher, not the cached top-k targets."""
    train(train_args(topk_cache, tmp_path / "live", **{"loss.teacher_live": llama_dir, "train.steps": 2}))
    train(train_args(topk_cache, tmp_path / "cached", **{"train.steps": 2}))
    live = [r["loss"] for r in records(tmp_path / "live", "train")]
    cached = [r["loss"] for r in records(tmp_path / "cached", "train")]

    student, batch, real_vocab = start_of_training(topk_cache)
    teacher = AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()
    with torch.no_grad():
        s = torch.log_softmax(student(batch["input_ids"]).logits[..., :real_vocab].float(), -1)
        t = torch.log_softmax(teacher(batch["input_ids"]).logits[..., :real_vocab].float(), -1)
    expected = masked_mean((t.exp() * (t - s)).sum(-1), batch["loss_mask"])
    assert live[0] == pytest.approx(expected, rel=1e-4)
    # The top-8-plus-bucket KL of the cache is far smaller than the full KL on these near-uniform models.
    assert all(c < 0.5 * v for c, v in zip(cached, live, strict=True)), (cached, live)
    assert records(tmp_path / "live", "eval")[-1]["kl"] is not None


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


def test_hybrid_cache_trains_end_to_end(tmp_path, llama_dir, corpus_jsonl):
    """A hybrid cache (exact top-4 head + 8 tail draws) trains a student that starts far from the teacher.

    The near-uniform default student is already within sampling noise of the near-uniform teacher, so this one
    starts with larger weights (initializer_range 0.3). The held-out KL is the plug-in estimate over the stored
    ids, whose floor (about 4.1 nats here) is the entropy the 12 slots cannot hold; it starts near 5.5.
    """
    directory = cache(cache_args(llama_dir, corpus_jsonl, tmp_path / "c", **{
        "data.seq_len": 32, "cache.mode": "hybrid", "cache.top_k": 4, "cache.samples": 8})).directory
    manifest = read_manifest(directory)
    assert (manifest.mode, manifest.width) == ("hybrid", 12)
    far = STUDENT[:-1] + ", initializer_range: 0.3}"
    train(train_args(directory, tmp_path / "o", **{"train.steps": 20, "train.eval_every": 1, "student.config": far,
                                                   "train.checkpoint_every": 0, "train.lr": 0.01}))
    evals = records(tmp_path / "o", "eval")
    assert [r["step"] for r in evals] == list(range(1, 21))
    assert evals[-1]["kl"] < evals[0]["kl"] - 0.3, [r["kl"] for r in evals]
    losses = [r["loss"] for r in records(tmp_path / "o", "train")]
    assert losses[-1] < 0.9 * losses[0], losses

    # Step 1's loss is forward KL from the stored weights (head log-probs and tail_mass * count / N) to the
    # student's log-probs at the same ids; the tail bucket is empty.
    student, batch, real_vocab = start_of_training(directory, far)
    with torch.no_grad():
        q = torch.log_softmax(student(batch["input_ids"]).logits[..., :real_vocab].float(), -1)
    ids, p = batch["topk_ids"], batch["topk_logprobs"]
    valid = ids >= 0
    assert torch.allclose(torch.where(valid, p.exp(), 0.0).sum(-1), torch.ones(()), atol=2e-3)  # fp16 on disk
    q = q.gather(-1, ids.clamp(min=0))
    per_position = torch.where(valid, p.exp() * (p - q), 0.0).sum(-1)
    assert losses[0] == pytest.approx(masked_mean(per_position, batch["loss_mask"]), rel=1e-4)
    with pytest.raises(ConfigError, match="hybrid-mode cache"):
        train(train_args(directory, tmp_path / "p", **{"loss.temperature": 2.0}))
