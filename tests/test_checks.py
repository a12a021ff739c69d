"""Checks of small pieces with no other test: prefetch errors and shutdown, the logit-head check, ECE by hand,
the teacher-weight fingerprint, atomic directory replacement, and ``inspect``'s unique-id count."""
from __future__ import annotations

import errno
import gzip
import os
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from helpers import cache, cache_args, read_all

from pipeline.cache.config import CacheJob
from pipeline.cache.plan import make_plan
from pipeline.config_loading import load_config
from pipeline.demo.init_model import build_model
from pipeline.demo.tokenizer import QA_CORPUS
from pipeline.errors import TeacherError
from pipeline.models.head import LogitHead, check_logit_head
from pipeline.train.evaluate import ECE_BINS, CalibrationBins, HeldOutMetrics
from storage.describe import summarize
from storage.io import atomic
from storage.read.prefetch import prefetch
from storage.remote.store import open_cache


def prefetch_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "prefetch"}


def started_thread(iterator, before: set[threading.Thread]) -> tuple[object, threading.Thread]:
    """The first item of a prefetching iterator and the one thread it started."""
    first = next(iterator)
    (thread,) = prefetch_threads() - before
    return first, thread


# --- storage.read.prefetch ------------------------------------------------------------------------------------------


def test_prefetch_hands_the_sources_error_to_the_consumer_after_its_items():
    def source():
        yield from range(3)
        raise RuntimeError("shard 4 is corrupt")

    got = []
    with pytest.raises(RuntimeError, match="shard 4 is corrupt"):
        for item in prefetch(source(), depth=2):
            got.append(item)
    assert got == [0, 1, 2]


def test_prefetch_thread_stops_when_the_consumer_stops_early():
    produced = []

    def endless():
        n = 0
        while True:
            produced.append(n)
            yield n
            n += 1

    before = prefetch_threads()
    items = prefetch(endless(), depth=2)
    first, thread = started_thread(items, before)
    assert first == 0 and next(items) == 1
    time.sleep(0.3)  # the producer fills the queue and waits
    assert thread.is_alive() and len(produced) <= 2 + 2 + 1  # consumed + queued + the one waiting to be put
    items.close()
    thread.join(timeout=2.0)
    assert not thread.is_alive()
    count = len(produced)
    time.sleep(0.2)
    assert len(produced) == count


@pytest.mark.parametrize("fails", [False, True])
def test_prefetch_thread_stops_when_the_consumer_stops_after_a_finite_source_ended(fails):
    def finite():
        yield from range(3)
        if fails:
            raise RuntimeError("late error")

    before = prefetch_threads()
    items = prefetch(finite(), depth=2)
    _, thread = started_thread(items, before)
    time.sleep(0.3)  # items 1 and 2 fill the queue; the producer now waits to put the end marker (or the error)
    items.close()
    thread.join(timeout=1.0)
    assert not thread.is_alive()


# --- pipeline.models.head.check_logit_head ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()


def ids_for(model) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))


def test_check_logit_head_passes_a_plain_model(llama):
    check_logit_head(llama, LogitHead.of(llama), ids_for(llama))


def test_check_logit_head_refuses_a_forward_that_scales_its_logits(llama, monkeypatch):
    forward = llama.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    monkeypatch.setattr(llama, "forward", scaled)
    with pytest.raises(TeacherError, match=r"differ from Distillery's chunked lm_head by"):
        check_logit_head(llama, LogitHead.of(llama), ids_for(llama))

    def shifted(*args, **kwargs):  # a constant per row leaves the log-probs, and so the targets, unchanged
        out = forward(*args, **kwargs)
        out.logits = out.logits + 3.0
        return out

    monkeypatch.setattr(llama, "forward", shifted)
    check_logit_head(llama, LogitHead.of(llama), ids_for(llama))


def test_check_logit_head_refuses_a_softcap_the_forward_ignores(llama, monkeypatch):
    """Llama's forward never soft-caps, so a config asking for it makes the head disagree with the model."""
    monkeypatch.setattr(llama.config, "final_logit_softcapping", 0.05, raising=False)
    head = LogitHead.of(llama)
    assert head.softcap == 0.05
    with pytest.raises(TeacherError, match="differ"):
        check_logit_head(llama, head, ids_for(llama))


# --- pipeline.train.evaluate: ECE and empty metrics ------------------------------------------------------------


def test_calibration_bins_give_the_hand_computed_ece():
    # Softmax confidences 0.9 and 0.9 (bin 13: 13.5 -> 13), 0.62 (bin 9), 0.7 (bin 10) and 1.0 (bin 15, clamped to
    # the last bin 14), in two chunks, plus one masked-out row that must not count.
    chunks = [
        ([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.62, 0.2, 0.18]], [0, 1, 0], [True, True, True]),
        ([[0.2, 0.7, 0.1], [0.99, 0.005, 0.005]], [0, 0], [True, False]),
    ]
    bins = CalibrationBins()
    for probs, labels, mask in chunks:
        logits = torch.tensor(probs).log()
        predicted = bins.add(logits, torch.tensor(labels), torch.tensor(mask))
        assert predicted.tolist() == torch.tensor(probs).argmax(-1).tolist()
    saturated = torch.tensor([[40.0, 0.0, 0.0]])  # float32 softmax confidence exactly 1.0
    assert torch.softmax(saturated, -1).max().item() == 1.0
    bins.add(saturated, torch.tensor([2]), torch.tensor([True]))
    # Per bin |sum of confidences - number correct|: 13: |1.8 - 1| = 0.8; 9: |0.62 - 1| = 0.38; 10: |0.7 - 0| = 0.7;
    # 14: |1.0 - 0| = 1.0; over 5 counted rows.
    assert ECE_BINS == 15
    assert bins.ece() == pytest.approx((0.8 + 0.38 + 0.7 + 1.0) / 5, abs=1e-6)
    assert bins.sums[0].tolist() == [0] * 9 + [1, 1, 0, 0, 2, 1]


def test_held_out_metrics_without_tokens_are_none():
    empty = HeldOutMetrics().result()
    assert {k: empty[k] for k in ("ce", "ppl", "kl", "top1", "ece", "tokens")} == {
        "ce": None, "ppl": None, "kl": None, "top1": None, "ece": None, "tokens": 0}
    metrics = HeldOutMetrics()
    none = torch.zeros(4, dtype=torch.bool)
    metrics.add(torch.randn(4, 10), torch.tensor([1, 2, 3, -100]), none, none, torch.ones(4), torch.zeros(4, dtype=torch.long))
    assert {k: metrics.result()[k] for k in ("ce", "ppl", "kl", "top1", "ece")} == dict.fromkeys(
        ("ce", "ppl", "kl", "top1", "ece"))


# --- pipeline.cache.plan: the fingerprint follows the teacher's weights ------------------------------------------


@pytest.fixture(scope="module")
def peaked_teachers(tmp_path_factory, tokenizer_dir):
    """Two tiny Llamas with the same config and different seeds; large init weights give peaked distributions."""
    root = tmp_path_factory.mktemp("teachers")
    return [build_model(tokenizer_dir, root / f"seed{seed}", hidden=16, layers=1, heads=2, max_positions=128,
                        seed=seed, initializer_range=0.5) for seed in (0, 1)]


def test_teacher_weights_change_the_cache_fingerprint(tmp_path, peaked_teachers, corpus_jsonl):
    def fingerprint(model):
        return make_plan(load_config(CacheJob, None, cache_args(model, corpus_jsonl, tmp_path / "c"))).fingerprint

    a, b = peaked_teachers
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()
    first = fingerprint(a)
    assert fingerprint(a) == first
    assert fingerprint(b) != first
    moved = shutil.copytree(a, tmp_path / "elsewhere")  # the same weights under another path: the same cache
    assert fingerprint(moved) == first


def test_the_sampler_changes_the_fingerprint_and_multinomial_keeps_the_old_one(tmp_path, peaked_teachers,
                                                                              corpus_jsonl):
    """Systematic and multinomial draws are different caches; multinomial ones hash as before the key existed,
    and top-k caches, which draw nothing, do not depend on it."""
    def identity(**extra):
        args = cache_args(peaked_teachers[0], corpus_jsonl, tmp_path / "c", **extra)
        plan = make_plan(load_config(CacheJob, None, args))
        return plan.fingerprint, plan.header.fingerprint_identity

    systematic, with_key = identity(**{"cache.mode": "sample", "cache.sampler": "systematic"})
    multinomial, without_key = identity(**{"cache.mode": "sample", "cache.sampler": "multinomial"})
    assert systematic != multinomial and with_key["sampler"] == "systematic" and "sampler" not in without_key
    assert {k: v for k, v in with_key.items() if k != "sampler"} == without_key
    assert identity(**{"cache.mode": "sample"})[0] == multinomial  # the default
    assert identity(**{"cache.mode": "topk", "cache.sampler": "multinomial"})[0] == identity(**{"cache.mode": "topk"})[0]


# --- storage.io.atomic: replacing a directory ----------------------------------------------------------------------


def write_dir(path, text: str) -> None:
    with atomic.atomic_write(path) as tmp:
        tmp.mkdir()
        for name in ("a", "b", "c"):
            (tmp / name).write_text(text)


def contents(path) -> dict[str, str]:
    return {p.name: p.read_text() for p in path.iterdir()}


def hidden(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_failed_directory_replacement_keeps_the_old_copy(tmp_path, monkeypatch):
    final = tmp_path / "out" / "model"
    write_dir(final, "old")
    rename = os.rename
    refused = []

    def no_permission(src, dst):
        if atomic.TMP_MARKER in os.fspath(src) and os.fspath(dst) == os.fspath(final):
            refused.append(src)
            raise OSError(errno.EACCES, "Permission denied", os.fspath(dst))
        rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", no_permission)
    with pytest.raises(PermissionError):
        write_dir(final, "new")
    assert len(refused) == 1
    assert contents(final) == dict.fromkeys("abc", "old")
    assert hidden(final.parent) == []


def test_concurrent_directory_replacements_always_leave_a_complete_directory(tmp_path, monkeypatch):
    final = tmp_path / "model"
    rounds, writers = 20, 2
    start, done = threading.Barrier(writers), threading.Barrier(writers)
    errors, seen, races = [], [], []
    rename = os.rename

    def slow_rename(src, dst):
        try:
            rename(src, dst)
        except OSError as exc:
            races.append(exc.errno)
            raise
        if atomic.OLD_MARKER in os.fspath(dst):
            time.sleep(0.002)  # a slow file system: widen the gap in which ``final`` is absent

    monkeypatch.setattr(atomic.os, "rename", slow_rename)

    def writer(index):
        try:
            for r in range(rounds):
                start.wait()
                write_dir(final, f"{index}-{r}")
                done.wait()
                if index == 0:
                    seen.append(contents(final))
                    assert hidden(tmp_path) == [], hidden(tmp_path)
        except BaseException as exc:  # reported below; a broken barrier stops the other writer
            errors.append(exc)
            start.abort()
            done.abort()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert len(seen) == rounds
    for r, found in enumerate(seen):
        (text,) = set(found.values())  # all three files from one writer's copy
        assert found.keys() == {"a", "b", "c"} and text in {f"{i}-{r}" for i in range(writers)}
    assert errno.ENOTEMPTY in races, "the two writers never collided; the test did not exercise the retry"


# --- storage.describe: mean unique ids ---------------------------------------------------------------------------


def test_inspect_mean_unique_ids_counts_stored_ids_at_loss_positions(tmp_path, peaked_teachers):
    chat = tmp_path / "chat.jsonl"
    with gzip.open(QA_CORPUS, "rt") as source:
        chat.write_text("".join(next(source) for _ in range(60)))
    args = cache_args(peaked_teachers[0], chat, tmp_path / "c", **{"data.format": "chat", "data.seq_len": 64,
                                                                  "cache.mode": "sample", "cache.samples": 16})
    directory = cache(args).directory
    shards = read_all(directory).values()
    ids = np.concatenate([s["topk_ids"].reshape(-1, s["topk_ids"].shape[-1]) for s in shards])
    mask = np.concatenate([s["loss_mask"].reshape(-1) for s in shards]).astype(bool)
    unique = (ids >= 0).sum(-1)
    assert 0.3 < mask.mean() < 0.9  # prompts are masked out, so the mask matters
    assert unique.min() <= 8 and unique.max() == 16  # some positions fill every slot, others only a few
    summary = summarize(open_cache(directory))
    assert summary["width"] == 16
    assert summary["mean_unique_ids"] == pytest.approx(unique[mask].mean(), rel=1e-12)
    assert summary["mean_unique_ids"] != pytest.approx(unique.mean(), rel=1e-6)
