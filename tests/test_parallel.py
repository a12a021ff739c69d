"""Stage 2 across processes (gloo on CPU): DDP and FSDP2 against one process, elastic resume, the out_dir lock."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import cache, cache_args, train, train_args
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.errors import ConfigError
from storage.errors import DirectoryInUseError
from storage.io.locks import DirectoryLock

# A small LR keeps Adam from amplifying float noise, so runs that differ only in summation order stay close.
QUIET = {"train.lr": 1e-4, "train.eval_every": 2}


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory, llama_dir, corpus_jsonl):
    return cache(cache_args(llama_dir, corpus_jsonl, tmp_path_factory.mktemp("p") / "c", **{"data.seq_len": 32})).directory


def torchrun(args: list[str], log_path, nproc: int = 2) -> subprocess.Popen:
    """``distillery train`` under torchrun, output to ``log_path`` (a pipe could fill and block the workers)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "pipeline.cli", "train", *args]
    with open(log_path, "w") as log:
        return subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=log)


def records(out_dir, kind: str) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def relative_difference(a: dict, b: dict) -> float:
    """‖a − b‖ / ‖b‖ over every tensor of two state dicts with the same keys."""
    assert a.keys() == b.keys()
    diff = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in b)
    norm = sum(float((b[k].double() ** 2).sum()) for k in b)
    return (diff / norm) ** 0.5


def one_rank_reference(topk_cache, out_dir, **settings):
    """One process with two accumulated micro-batches: the same global batch of 8 as 2 ranks x 1."""
    train(train_args(topk_cache, out_dir, **settings, **{"train.grad_accum": 2}))
    return load_file(out_dir / "final" / "model.safetensors")


TWO_RANKS = {**QUIET, "train.steps": 4, "train.checkpoint_every": 2}


@pytest.fixture(scope="module")
def two_ranks_reference(tmp_path_factory, topk_cache):
    """The 1-rank run both strategies are compared with (the same settings for DDP and FSDP): its out_dir and
    final weights."""
    out_dir = tmp_path_factory.mktemp("one") / "one"
    return out_dir, one_rank_reference(topk_cache, out_dir, **TWO_RANKS)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_train_what_one_rank_trains(tmp_path, topk_cache, two_ranks_reference, strategy):
    """Logged global losses, held-out metrics, sample audits and final weights of 2 ranks equal 1 rank's."""
    run = torchrun(train_args(topk_cache, tmp_path / "o", **TWO_RANKS, **{"train.strategy": strategy}), tmp_path / "log")
    assert run.wait(timeout=300) == 0, (tmp_path / "log").read_text()[-3000:]
    one, reference = two_ranks_reference
    for kind, field in (("train", "loss"), ("train", "samples_sha256"), ("eval", "kl"), ("eval", "ce")):
        ours = [r[field] for r in records(tmp_path / "o", kind)]
        theirs = [r[field] for r in records(one, kind)]
        assert len(ours) == len(theirs) > 0
        assert ours == (theirs if field == "samples_sha256" else pytest.approx(theirs, rel=1e-5)), (kind, field)
    final = tmp_path / "o" / "final"
    assert relative_difference(load_file(final / "model.safetensors"), reference) < 1e-5
    state = json.loads((tmp_path / "o" / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert (state["strategy"], state["world_size"], state["global_batch"], state["samples"]) == (strategy, 2, 8, 32)

    model = AutoModelForCausalLM.from_pretrained(str(final))
    tokenizer = AutoTokenizer.from_pretrained(str(final))
    prompt = tokenizer("In the beginning", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4


def test_two_ddp_ranks_train_a_student_of_another_tokenizer_as_one_rank_does(tmp_path, topk_cache):
    """Student batches are built per micro-batch from the cache's order, so 2 ranks x 1 equal 1 rank x 2."""
    from pipeline.demo.tokenizer import build_unigram_tokenizer

    settings = {**TWO_RANKS, "student.tokenizer": build_unigram_tokenizer(tmp_path / "uni", 600, limit_bytes=100_000),
                "loss.cross_tokenizer": "uld", "loss.alpha": 0.5}
    reference = one_rank_reference(topk_cache, tmp_path / "one", **settings)
    run = torchrun(train_args(topk_cache, tmp_path / "o", **settings, **{"train.strategy": "ddp"}), tmp_path / "log")
    assert run.wait(timeout=300) == 0, (tmp_path / "log").read_text()[-3000:]
    for kind, field in (("train", "loss"), ("train", "samples_sha256"), ("eval", "bpb")):
        ours, theirs = ([r[field] for r in records(out, kind)] for out in (tmp_path / "o", tmp_path / "one"))
        assert len(ours) == len(theirs) > 0
        assert ours == (theirs if field == "samples_sha256" else pytest.approx(theirs, rel=1e-5)), (kind, field)
    assert relative_difference(load_file(tmp_path / "o" / "final" / "model.safetensors"), reference) < 1e-5


def lock_is_free(out_dir) -> bool:
    lock = DirectoryLock(out_dir)
    try:
        lock.acquire("train.out_dir")
    except DirectoryInUseError:
        return False
    lock.release()
    return True


def kill_job(run: subprocess.Popen) -> None:
    """``kill -9`` torchrun and its workers, as a cluster ends a job."""
    for pid in [*worker_pids(run.pid), run.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    run.wait()


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_elastic_resume_continues_on_the_same_samples(tmp_path, topk_cache):
    """2 FSDP ranks are killed after a checkpoint; 1 rank with doubled accumulation finishes the job. Every
    step's samples (the audit chain) equal an uninterrupted 1-rank run's, and the weights agree."""
    settings = {**QUIET, "train.steps": 40, "train.checkpoint_every": 3, "train.eval_every": 0}
    out = tmp_path / "o"
    run = torchrun(train_args(topk_cache, out, **settings, **{"train.strategy": "fsdp"}), tmp_path / "log")
    try:
        wait_for(lambda: (out / "checkpoints" / "step-00000006").is_dir() or run.poll() is not None, 300,
                 "the second checkpoint")
    finally:
        kill_job(run)
    wait_for(lambda: lock_is_free(out), 60, "the killed job's workers to exit")
    assert not (out / "final").exists(), "the job finished before it was killed"
    last = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert json.loads((last / "state.json").read_text())["world_size"] == 2
    train(train_args(topk_cache, out, **settings, **{"train.grad_accum": 2, "train.strategy": "single"}))
    reference = one_rank_reference(topk_cache, tmp_path / "one", **settings)
    resumed = [(r["step"], r["samples_sha256"]) for r in records(out, "train")]
    assert resumed == [(r["step"], r["samples_sha256"]) for r in records(tmp_path / "one", "train")]
    assert [step for step, _ in resumed] == list(range(1, 41))
    assert relative_difference(load_file(out / "final" / "model.safetensors"), reference) < 1e-5


def test_a_changed_global_batch_is_refused(tmp_path, topk_cache):
    train(train_args(topk_cache, tmp_path / "o", **{"train.steps": 2, "train.checkpoint_every": 1}))
    with pytest.raises(ConfigError, match=r"global batch of 4 \(batch_size 4 x world size 1 x grad_accum 1\), "
                                          r"but this job's is 8 \(batch_size 4 x world size 1 x grad_accum 2\)"):
        train(train_args(topk_cache, tmp_path / "o", **{"train.steps": 2, "train.grad_accum": 2}))


def worker_pids(launcher: int) -> list[int]:
    """Processes whose parent is ``launcher`` (torchrun's workers)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == launcher:
                children.append(int(entry))
    return children


def test_workers_orphaned_by_a_killed_torchrun_keep_others_out(tmp_path, topk_cache):
    """``kill -9`` of torchrun leaves its workers training; a new run on the same out_dir is refused, naming
    the holder, until they are gone, so they can never write checkpoints into a directory it resumes from."""
    out = tmp_path / "o"
    args = train_args(topk_cache, out, **{"train.steps": 100_000, "train.checkpoint_every": 5, "train.eval_every": 0})
    run = torchrun(args, tmp_path / "log")
    workers = []
    try:
        wait_for(lambda: (out / "checkpoints").is_dir() or run.poll() is not None, 300, "a first checkpoint")
        workers = worker_pids(run.pid)
        assert len(workers) == 2
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        time.sleep(1.0)
        assert all(os.path.exists(f"/proc/{pid}") for pid in workers), "the workers died with torchrun"
        again = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", *args], capture_output=True,
                               text=True, timeout=300)
        assert again.returncode == 2, again.stderr[-2000:]
        message = again.stderr.strip().splitlines()[-1]
        assert "is in use by pid" in message and str(out) in message and "Traceback" not in again.stderr
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    wait_for(lambda: lock_is_free(out), 60, "the orphaned workers to exit")
