"""LoRA students (``student.lora``): only the adapters train, ``final/`` is the merged model or peft's adapter folder
(the same student either way), and an interrupted 2-rank DDP run resumes to the uninterrupted run's bits.

Run as a script under torchrun (``tests/test_lora.py CACHE STUDENT ROOT``), this file is one rank of the DDP test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cache, cache_args, train, train_args
from safetensors.torch import load_file

from pipeline.demo.init_model import build_model
from pipeline.errors import ConfigError
from pipeline.train.lora import INSTALL, LoraConfig, attach_lora, require_peft

TARGETS = ("q_proj", "v_proj")
"""peft's default target modules for Llama."""


def lora_args(cache_dir: Path, out_dir: Path, student: Path, merge: bool, **extra) -> list[str]:
    """A 4-step run of a rank-4 LoRA on the pretrained ``student``, checkpointed every 2 steps."""
    settings = {"student.config": "null", "student.model": student, "student.lora": f"{{r: 4, merge: {merge}}}",
                "train.steps": 4, "train.checkpoint_every": 2, "train.eval_every": 0, "train.lr": 0.01, **extra}
    return train_args(cache_dir, out_dir, **settings)


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory, llama_dir, corpus_jsonl) -> Path:
    return cache(cache_args(llama_dir, corpus_jsonl, tmp_path_factory.mktemp("lora") / "c", **{"data.seq_len": 32})).directory


@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer_dir) -> Path:
    """A pretrained student: a random-init tiny Llama (not the teacher) saved with the test tokenizer."""
    return build_model(tokenizer_dir, tmp_path_factory.mktemp("lora") / "student", arch="llama", hidden=32, layers=1,
                       heads=2, max_positions=256, seed=1)


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, topk_cache, student) -> tuple[Path, list[torch.Size]]:
    """The adapter final/, and the shapes of the tensors its optimizer was given."""
    optimizers = []

    class RecordedAdamW(torch.optim.AdamW):
        def __init__(self, params, **settings):
            super().__init__(params, **settings)
            optimizers.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim, "AdamW", RecordedAdamW)
        final = Path(train(lora_args(topk_cache, tmp_path_factory.mktemp("lora") / "adapter", student, merge=False)))
    return final, [p.shape for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]


@pytest.fixture(scope="module")
def merged_final(tmp_path_factory, topk_cache, student) -> Path:
    return Path(train(lora_args(topk_cache, tmp_path_factory.mktemp("lora") / "merged", student, merge=True)))


def checkpoint_tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, from all its ranks' safetensors files."""
    return {k: v for path in sorted(step_dir.glob("*.safetensors")) for k, v in load_file(path).items()}


def test_only_the_adapters_train(adapter_run, student):
    """The adapter final/ holds peft's files and the tokenizer, no model; the optimizer was given the adapters
    alone, they moved off their zero init, and the checkpointed base is the pretrained student's, bit for bit."""
    adapter_final, optimized_shapes = adapter_run
    names = {p.name for p in adapter_final.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert not names & {"config.json", "model.safetensors"}
    assert json.loads((adapter_final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(student)
    adapters = load_file(adapter_final / "adapter_model.safetensors")
    assert {k.split(".")[-2] for k in adapters} == {"lora_A", "lora_B"}
    assert {k.split(".")[-3] for k in adapters} == set(TARGETS)
    assert sorted(optimized_shapes) == sorted(v.shape for v in adapters.values())
    assert all(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k), "lora_B is still at its zero init"

    saved = checkpoint_tensors(adapter_final.parent / "checkpoints" / "step-00000004")
    pretrained = load_file(student / "model.safetensors")
    base = {k.removeprefix("model.").replace(".base_layer", ""): v for k, v in saved.items()
            if k.startswith("model.") and "lora_" not in k}
    assert base.keys() == pretrained.keys()
    assert all(torch.equal(base[k], pretrained[k]) for k in pretrained)
    optimized = {k for k in saved if k.startswith("optim.state.")}
    assert optimized and all("lora_" in k for k in optimized)


def logits(model, tokenizer_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(str(tokenizer_dir))("In the beginning was the word", return_tensors="pt")
    with torch.no_grad():
        return model(**prompt).logits


def test_merged_and_adapter_finals_are_the_same_student(merged_final, adapter_run, student):
    """The merged final/ is a plain model folder: the pretrained weights but where the adapters sat; the adapter
    final/ loaded with peft over the base gives the merged model's logits."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    assert not (merged_final / "adapter_config.json").exists()
    merged = load_file(merged_final / "model.safetensors")
    pretrained = load_file(student / "model.safetensors")
    assert merged.keys() == pretrained.keys()
    changed = {k for k in pretrained if not torch.equal(merged[k], pretrained[k])}
    assert changed == {f"model.layers.0.self_attn.{name}.weight" for name in TARGETS}

    ours = logits(AutoModelForCausalLM.from_pretrained(str(merged_final)), merged_final)
    adapter_final = adapter_run[0]
    theirs = logits(AutoPeftModelForCausalLM.from_pretrained(str(adapter_final)), adapter_final)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert not torch.allclose(ours, logits(AutoModelForCausalLM.from_pretrained(str(student)), student), atol=1e-3)


@pytest.mark.parametrize(("strategy", "targets", "message"), ids=["fsdp", "unknown-target-module"], argvalues=[
    ("fsdp", None, "student.lora trains under train.strategy single or ddp, not fsdp: use ddp"),
    ("single", ["qkv_proj"], r"student.lora.target_modules \['qkv_proj'\]: Target modules \{'qkv_proj'\} not found.*"
                             r"e.g. \[q_proj, v_proj\]"),
])
def test_what_lora_cannot_adapt_is_refused(student, strategy, targets, message):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(student))
    with pytest.raises(ConfigError, match=message):
        attach_lora(model, LoraConfig(target_modules=targets), strategy, seed=0)


def test_a_missing_peft_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # ``import peft`` then raises ImportError
    with pytest.raises(ConfigError, match=r"student\.lora needs the peft package.*" + INSTALL.replace("[", r"\[")):
        require_peft()


def test_an_interrupted_ddp_run_resumes_to_the_same_bits(tmp_path, topk_cache, student):
    """2 gloo ranks train a merged LoRA student whole, then again interrupted after step 3 (its last checkpoint at
    step 2) and resumed: the resumed run's losses and final weights equal the uninterrupted run's exactly."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               str(topk_cache), str(student), str(tmp_path)]
    with open(tmp_path / "log", "w") as log:
        run = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=log, timeout=300)
    assert run.returncode == 0, (tmp_path / "log").read_text()[-3000:]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    losses = [[(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
               if r["type"] == "train"] for out in (whole, resumed)]
    assert losses[0] == losses[1] and [step for step, _ in losses[0]] == [1, 2, 3, 4]
    assert "resumed from" in (tmp_path / "log").read_text()
    ours, theirs = load_file(resumed / "final" / "model.safetensors"), load_file(whole / "final" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def ddp_worker(cache_dir: Path, student: Path, root: Path) -> None:
    """One rank of the DDP test: the uninterrupted run, then the interrupted one and its resume, in one process
    group. The interruption is a ``KeyboardInterrupt`` on every rank as step 3's metrics are written."""
    from pipeline.train import recipe

    train(lora_args(cache_dir, root / "whole", student, merge=True))
    write = recipe.MetricsLog.write

    def interrupt(self, record):
        if record["step"] == 3:
            raise KeyboardInterrupt("interrupted")
        write(self, record)

    recipe.MetricsLog.write = interrupt
    try:
        train(lora_args(cache_dir, root / "resumed", student, merge=True))
    except KeyboardInterrupt:
        pass
    recipe.MetricsLog.write = write
    assert not (root / "resumed" / "final").exists()
    train(lora_args(cache_dir, root / "resumed", student, merge=True))


if __name__ == "__main__":
    ddp_worker(*map(Path, sys.argv[1:4]))
