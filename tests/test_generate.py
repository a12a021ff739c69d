"""``distillery generate``: batched greedy decoding equals transformers' one prompt at a time, sampled rows are a
function of (model, prompts, settings, seed) whatever the parts and kills, a second run is a hit, and the rows
are the documented columns."""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.config_loading import load_config
from pipeline.errors import DataError
from pipeline.generate.config import GenerateJob
from pipeline.generate.run import run_generate
from storage import read_folder_manifest

ASSETS = Path(__file__).resolve().parent.parent / "pipeline" / "demo" / "assets"
COLUMNS = ["prompt_index", "sample_index", "messages", "reference", "prompt_ids", "completion_ids",
           "completion_logprobs", "finish_reason"]


@pytest.fixture(scope="module")
def recitations(tmp_path_factory) -> Path:
    """24 chat prompts: a user turn asking for a verse, and the verse as the reference answer."""
    path = tmp_path_factory.mktemp("prompts") / "qa.jsonl"
    with gzip.open(ASSETS / "kjv_qa.jsonl.gz", "rt") as source:
        path.write_text("".join(next(source) for _ in range(24)))
    return path


def settings(model: Path, data: Path, out: Path, **extra) -> list[str]:
    values = {"generate.model": model, "generate.out_dir": out, "data.path": data, "data.format": "chat",
              "generate.max_new_tokens": 12, "generate.batch_size": 4, "generate.shard_size": 3,
              "generate.dtype": "fp32", "device": "cpu", **extra}
    return [f"{k}={v}" for k, v in values.items()]


def generate(args: list[str], **kwargs):
    return run_generate(load_config(GenerateJob, None, args), **kwargs)


def rows(out: Path) -> list[dict]:
    record, shards = read_folder_manifest(out)
    return [row for shard in shards for row in pq.read_table(out / shard.path).to_pylist()]


def test_prompts_leave_out_the_held_out_documents_that_the_task_score_reads(recitations, tokenizer_dir):
    from transformers import AutoTokenizer

    from pipeline.data.config import DataConfig
    from pipeline.data.prompts import load_prompts
    from pipeline.data.sources import holdout_indices

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    data = DataConfig(path=str(recitations), format="chat", holdout_fraction=0.25, seed=3)
    train, held = load_prompts(data, tokenizer, None), load_prompts(data, tokenizer, None, split="eval")
    assert [p.index for p in held] == holdout_indices(24, 0.25, 3).tolist()
    assert sorted(p.index for p in train + held) == list(range(24))
    assert [p.index for p in load_prompts(data, tokenizer, 2, first=3)] == [p.index for p in train[3:5]]
    with pytest.raises(DataError, match="data.holdout_fraction > 0 or data.eval_path"):
        load_prompts(DataConfig(path=str(recitations), format="chat"), tokenizer, None, split="eval")


def test_greedy_rows_equal_transformers_generate_one_prompt_at_a_time(llama_dir, recitations, tmp_path):
    result = generate(settings(llama_dir, recitations, tmp_path / "g", **{"generate.temperature": 0}))
    assert result.complete and not result.hit
    table = rows(tmp_path / "g")
    assert list(pq.read_table(tmp_path / "g" / "rows-00000.parquet").column_names) == COLUMNS
    assert len(table) == 24 and [r["prompt_index"] for r in table] == list(range(24))
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()
    for row in table:
        prompt = torch.tensor([row["prompt_ids"]])
        want = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12,
                              pad_token_id=0)[0, prompt.shape[1]:].tolist()
        assert row["completion_ids"] == want
        assert row["finish_reason"] == ("eos" if want[-1] == model.generation_config.eos_token_id else "length")
        with torch.no_grad():
            logits = model(torch.tensor([row["prompt_ids"] + want])).logits[0, prompt.shape[1] - 1 : -1].float()
        raw = torch.log_softmax(logits, -1).gather(-1, torch.tensor(want)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(row["completion_logprobs"]), raw, atol=1e-4, rtol=1e-4)
    assert table[0]["messages"][:-1] == [{"role": "user", "content": "Recite Ge 1:1."}]
    assert table[0]["messages"][-1]["role"] == "assistant"
    assert table[0]["reference"] == "In the beginning God created the heaven and the earth."


def test_sampled_rows_are_the_same_after_kill_9_and_over_two_parts_and_a_rerun_is_a_hit(llama_dir, recitations,
                                                                                        tmp_path):
    extra = {"generate.samples_per_prompt": 2, "generate.top_p": 0.9, "generate.seed": 7}
    whole = generate(settings(llama_dir, recitations, tmp_path / "whole", **extra))
    reference, _ = read_folder_manifest(whole.directory)

    for task in (0, 1):  # two Slurm array tasks, one after the other
        parts = generate(settings(llama_dir, recitations, tmp_path / "parts", **extra), num_tasks=2, task_index=task)
    assert parts.complete and read_folder_manifest(tmp_path / "parts")[0]["shards"] == reference["shards"]

    # Killed and resumed as separate processes, against an uninterrupted one; all on one thread, as the last bits
    # of the logits (and so a rare draw) may differ between thread counts.
    one_shard_each = {**extra, "generate.shard_size": 1}

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "pipeline", "-q", "generate",
                *settings(llama_dir, recitations, out, **one_shard_each)]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command(tmp_path / "uninterrupted"), check=True, capture_output=True, env=env)
    killed = tmp_path / "killed"
    job = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while not list(killed.glob("*.done.json")) and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.005)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert not (killed / "manifest.json").exists(), "the job ended before it was killed: nothing was tested"
    done_before = len(list(killed.glob("*.done.json")))
    assert 0 < done_before < 24
    subprocess.run(command(killed), check=True, capture_output=True, env=env)
    assert rows(killed) == rows(tmp_path / "uninterrupted")

    again = generate(settings(llama_dir, recitations, tmp_path / "whole", **extra))
    assert again.hit and read_folder_manifest(tmp_path / "whole")[0] == reference
    assert json.loads((tmp_path / "whole" / "manifest.json").read_text())["rows"] == 48


def test_a_cache_on_a_generation_targets_the_completions_names_it_and_follows_its_changes(llama_dir, recitations,
                                                                                         tmp_path):
    from helpers import cache, cache_args, read_all

    from storage import read_manifest

    out = tmp_path / "g"
    generate(settings(llama_dir, recitations, out, **{"generate.seed": 1, "generate.max_prompts": 8}))
    generation, _ = read_folder_manifest(out)
    args = cache_args(llama_dir, out, tmp_path / "caches", **{"data.holdout_fraction": 0.0})
    args = [a.replace("cache.dir=", "cache.root=") for a in args]
    first = read_manifest(cache(args).directory)
    assert first.dataset["generation"]["fingerprint"] == generation["fingerprint"]
    assert first.dataset["documents"] == {"train": 8}

    # Every completion token is a target, and no prompt token is: loss_mask row j marks the token after row j.
    stream = [(i, m) for shard in read_all(first.location).values()
              for ids, mask in zip(shard["input_ids"], shard["loss_mask"]) for i, m in zip(ids, mask)]
    position = 0
    for row in rows(out):
        prompt, completion = row["prompt_ids"], row["completion_ids"]
        document = stream[position : position + len(prompt) + len(completion)]
        assert [i for i, _ in document] == prompt + completion
        assert [m for _, m in document] == [0] * (len(prompt) - 1) + [1] * len(completion) + [0]
        position += len(prompt) + len(completion) + 1  # and the EOS that separates rows, never a target

    generate(settings(llama_dir, recitations, tmp_path / "g2", **{"generate.seed": 2, "generate.max_prompts": 8}))
    out.rename(tmp_path / "g1")
    (tmp_path / "g2").rename(out)  # another generation at the same path
    second = read_manifest(cache(args).directory)
    assert second.fingerprint != first.fingerprint
    assert second.dataset["generation"]["fingerprint"] == read_folder_manifest(out)[0]["fingerprint"]


def test_the_manifest_scores_the_answers_against_their_references(llama_dir, recitations, tmp_path):
    from pipeline.generate.score import chrf, exact_match

    generate(settings(llama_dir, recitations, tmp_path / "g", **{"generate.max_prompts": 6}))
    record, _ = read_folder_manifest(tmp_path / "g")
    answers = [(row["messages"][-1]["content"], row["reference"]) for row in rows(tmp_path / "g")]
    assert record["score"]["scored"] == 6
    assert record["score"]["chrf"] == pytest.approx(sum(chrf(a, r) for a, r in answers) / 6)
    assert record["score"]["exact_match"] == sum(exact_match(a, r) for a, r in answers) / 6
    verse = "In the beginning God created the heaven and the earth."
    assert chrf(verse, verse) == 1.0 and exact_match(verse, " In the  beginning God created the heaven and the earth.")
    assert 0.5 < chrf(verse.replace("created", "made"), verse) < 1.0 and chrf("xyz", verse) == 0.0


def test_a_generation_at_a_url_is_written_and_cached_like_a_local_one(llama_dir, recitations, bucket, tmp_path):
    from helpers import cache, cache_args

    from storage import read_manifest

    extra = {"generate.max_prompts": 4, "generate.local_dir": tmp_path / "work"}
    local = generate(settings(llama_dir, recitations, tmp_path / "g", **extra))
    remote = generate(settings(llama_dir, recitations, f"{bucket}/gen", **extra))
    assert remote.complete and remote.directory == f"{bucket}/gen"
    assert generate(settings(llama_dir, recitations, f"{bucket}/gen", **extra)).hit
    want = read_folder_manifest(local.directory)[0]
    args = cache_args(llama_dir, f"{bucket}/gen", tmp_path / "c", **{"data.holdout_fraction": 0.0})
    manifest = read_manifest(cache(args).directory)
    assert manifest.dataset["generation"]["fingerprint"] == want["fingerprint"]
    assert manifest.dataset["documents"] == {"train": 4}
