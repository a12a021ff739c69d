"""The public Python API: the stage functions, the cache as a dataset in train's order, kd_loss against the train
step's loss, and examples/hf_trainer.py's first loss against ``distillery train``'s on the same batch and weights."""
from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import STUDENT, cache_args, train_args
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from pipeline import CacheDataset, CacheJob, LossConfig, TrainJob, collate, kd_loss, load_job, run_cache, run_train
from pipeline.dist import World
from pipeline.errors import ConfigError
from pipeline.models.head import LogitHead
from pipeline.train.config import StudentConfig
from pipeline.train.metrics import chain_samples
from pipeline.train.step import LossFacts, combine, micro_batch_sums, token_counts
from pipeline.train.student import build_student
from storage import CacheError, read_manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory, llama_dir, corpus_jsonl) -> Path:
    return run_cache(load_job(CacheJob, overrides=cache_args(llama_dir, corpus_jsonl, tmp_path_factory.mktemp("a") / "c",
                                                             **{"data.seq_len": 32})))


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, topk_cache) -> Path:
    """A random tiny student saved with save_pretrained, with the cache's tokenizer. Its weights are large enough
    for a loss far from the near-zero KL of two near-uniform random models, so that another batch shows."""
    manifest = read_manifest(topk_cache)
    tokenizer = AutoTokenizer.from_pretrained(str(topk_cache / manifest.tokenizer_dir))
    config = StudentConfig(config=yaml.safe_load(STUDENT) | {"initializer_range": 0.5})
    model = build_student(config, manifest.vocab_size, tokenizer)
    folder = tmp_path_factory.mktemp("student")
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def test_trainer_example_first_loss_is_distillery_trains(tmp_path, topk_cache, student_dir):
    settings = {"student.config": "null", "student.model": student_dir, "train.steps": 1, "train.precision": "fp32",
                "train.batch_size": 4, "train.seed": 0}
    run_train(load_job(TrainJob, overrides=train_args(topk_cache, tmp_path / "train", **settings)))
    first = json.loads((tmp_path / "train" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["type"] == "train" and first["step"] == 1

    spec = importlib.util.spec_from_file_location("hf_trainer", ROOT / "examples" / "hf_trainer.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trainer = example.main(["--cache", str(topk_cache), "--student", str(student_dir), "--out", str(tmp_path / "hf"),
                            "--steps", "2", "--batch-size", "4", "--lr", "1e-3", "--seed", "0", "--log-every", "1"])
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    assert len(losses) == 2 and losses[0] != losses[1] and first["loss"] > 0.01
    assert losses[0] == pytest.approx(first["loss"], abs=1e-5)
    assert {"model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}

    # The same batch: the dataset's first batch chains to the sample hash train logged for its first step.
    batch = next(iter(DataLoader(CacheDataset(topk_cache, 4), batch_size=4, collate_fn=collate)))
    assert chain_samples("", [batch["sample_index"]], World()) == first["samples_sha256"]


def _sample_indices(dataset: CacheDataset, batches: int, workers: int = 0) -> list[list[int]]:
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate, num_workers=workers)
    return [batch["sample_index"].tolist() for batch, _ in zip(loader, range(batches))]


def test_dataset_order_is_train_order_for_any_world_size(topk_cache):
    one = _sample_indices(CacheDataset(topk_cache, 2, seed=3, shuffle_buffer=16, grad_accum=2), 8)
    ranks = [_sample_indices(CacheDataset(topk_cache, 2, seed=3, shuffle_buffer=16, rank=r, world_size=2), 4, workers=w)
             for r, w in ((0, 2), (1, 0))]
    # Step s of one rank accumulating two micro-batches holds rank 0's then rank 1's micro-batch of step s.
    assert one == [ids for step in zip(*ranks) for ids in step]
    assert len({i for ids in one for i in ids}) == 16  # 8 batches of 2 distinct sequences, not a repeated batch
    resumed = CacheDataset(topk_cache, 2, seed=3, shuffle_buffer=16, grad_accum=2, start_step=2)
    assert _sample_indices(resumed, 2) == one[4:6]
    assert _sample_indices(pickle.loads(pickle.dumps(resumed)), 2) == one[4:6]  # as a spawned worker gets it


def test_kd_loss_is_the_train_steps_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab, real_vocab = 48, 45  # the last rows are padding: the loss ignores them
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    teacher = torch.randn(2, 6, 5).log_softmax(-1)  # 4 stored entries (some ids padding rows) and the tail
    batch = {"input_ids": torch.randint(0, real_vocab, (2, 6)),
             "topk_ids": torch.stack([torch.randperm(vocab)[:4] for _ in range(12)]).reshape(2, 6, 4),
             "topk_logprobs": teacher[..., :4].sort(-1, descending=True).values, "tail_logprob": teacher[..., 4],
             "loss_mask": torch.rand(2, 6) > 0.3, "sample_index": torch.tensor([7, 9])}
    facts = LossFacts(real_vocab=real_vocab, cache_temperature=1.5)
    for loss in (LossConfig(), LossConfig(kind="reverse_kl", tail="renormalize", alpha=0.3, temperature=2.0),
                 LossConfig(kind="jsd", tail="bucket", beta=0.3), LossConfig(tail="ground_truth"), LossConfig(kind="ce")):
        model.zero_grad()
        ours = kd_loss(model(input_ids=batch["input_ids"]).logits, batch, loss, real_vocab=real_vocab,
                       cache_temperature=1.5)
        ours.backward()
        our_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        sums = micro_batch_sums(model, LogitHead.of(model), batch, loss, facts, chunk_size=5)
        reference = combine(*sums, *token_counts(batch).tolist(), loss)
        reference.backward()
        assert ours.dtype == torch.float32 and ours.ndim == 0 and reference.item() > 0
        assert ours.item() == pytest.approx(reference.item(), rel=1e-6), loss
        assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(our_grads, model.parameters())), loss


def test_load_job_and_bad_input(tmp_path, topk_cache):
    (tmp_path / "train.yaml").write_text("cache: {dir: somewhere}\ntrain: {out_dir: out, steps: 5}\n")
    job = load_job(TrainJob, tmp_path / "train.yaml", ["train.steps=7", "student.config={model_type: llama}"])
    assert (job.cache.dir, job.train.out_dir, job.train.steps) == ("somewhere", "out", 7)
    assert load_job(TrainJob, {"cache": {"dir": "a"}, "train": {"out_dir": "b"}}, "student.model=s").student.model == "s"
    with pytest.raises(ConfigError, match="train.stpes: unknown key"):
        load_job(TrainJob, {"train": {"stpes": 1}})
    with pytest.raises(ConfigError, match="batch_size: must be >= 1"):
        CacheDataset(topk_cache, 0)
    with pytest.raises(ConfigError, match="rank and world_size together"):
        CacheDataset(topk_cache, 2, rank=1)
    with pytest.raises(CacheError, match="cache.dir"):
        CacheDataset(tmp_path / "missing", 2)
    with pytest.raises(ConfigError, match="loss.teacher_live"):
        kd_loss(torch.zeros(1, 2, 4), {}, LossConfig(teacher_live="t"), real_vocab=4, cache_temperature=1.0)
    with pytest.raises(ConfigError, match="real_vocab: is 5, more than the 4 logits"):
        kd_loss(torch.zeros(1, 2, 4), {}, real_vocab=5, cache_temperature=1.0)


def test_package_root_exports_the_api_lazily():
    import pipeline.api

    assert sorted(pipeline.__all__) == sorted(pipeline.api.__all__)
    assert all(getattr(pipeline, name) is getattr(pipeline.api, name) for name in pipeline.__all__)
    with pytest.raises(AttributeError):
        pipeline.micro_batch_sums  # noqa: B018 (private names are not re-exported)
    loaded = subprocess.run([sys.executable, "-c", "import sys, pipeline; print('torch' in sys.modules)"],
                            capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "False"
