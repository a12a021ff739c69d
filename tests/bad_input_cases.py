"""The table of bad inputs: each case builds a command line (and the files it needs), names what its one-line
error must say, and which output folders must not be marked complete. ``test_bad_input`` runs them."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from gguf_files import bad_gguf_cases
from helpers import STUDENT, cache, cache_args, train, train_args

from pipeline.demo.tokenizer import build_tokenizer


@dataclass(frozen=True)
class Inputs:
    """What a case builds on: its own empty folder and the module's shared, valid inputs."""

    tmp: Path
    teacher: Path
    corpus: Path
    cache: Path
    """A finished top-k cache of ``corpus`` (data.seq_len 32) with eval shards."""
    run: Path
    """A run directory whose rounds have not run yet."""


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Inputs], list[str]]
    expect: tuple[str, ...]
    """Substrings of the one error line."""
    outputs: tuple[str, ...] = ()
    """Folders under ``Inputs.tmp`` that the command must leave without any new completion marker."""
    untouched: tuple[str, ...] = ()
    """Folders under ``Inputs.tmp`` whose files the command must not change."""


CACHE_OUT, TRAIN_OUT, RUN_OUT, GENERATE_OUT = ("c",), ("o",), ("run", "caches"), ("g",)


def cache_cmd(i: Inputs, **extra) -> list[str]:
    return ["cache", *cache_args(i.teacher, i.corpus, i.tmp / "c", **extra)]


def train_cmd(i: Inputs, **extra) -> list[str]:
    return ["train", *train_args(i.cache, i.tmp / "o", **extra)]


def generate_cmd(i: Inputs, **extra) -> list[str]:
    settings = {"generate.model": i.teacher, "generate.out_dir": i.tmp / "g", "data.path": i.corpus,
                "generate.max_new_tokens": 8, "generate.max_prompts": 2, "device": "cpu", **extra}
    return ["generate", *(f"{k}={v}" for k, v in settings.items())]


def other_tokenizer(i: Inputs) -> Path:
    """A byte-level BPE with another vocabulary than the teacher's."""
    return build_tokenizer(i.tmp / "other-tokenizer", vocab_size=700, limit_bytes=100_000)


def cross_tokenizer_on_old_cache(i: Inputs) -> list[str]:
    """A cache without ``token_role`` (as every cache made before text alignment) and a student of another tokenizer."""
    old = cache(cache_args(i.teacher, i.corpus, i.tmp / "old", **{"data.seq_len": 32,
                                                                   "cache.text_alignment": "false"})).directory
    return ["train", *train_args(old, i.tmp / "o", **{"student.tokenizer": other_tokenizer(i),
                                                       "loss.cross_tokenizer": "uld"})]


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def with_data(name: str, content: str | bytes, **extra) -> Callable[[Inputs], list[str]]:
    """A cache command whose ``data.path`` is a file ``name`` holding ``content``."""
    return lambda i: cache_cmd(i, **{"data.path": write(i.tmp / name, content), **extra})


def with_teacher(edit: Callable[[Path], None]) -> Callable[[Inputs], list[str]]:
    """A cache command whose teacher is a copy of the shared one, changed by ``edit(folder)``."""
    def argv(i: Inputs) -> list[str]:
        folder = Path(shutil.copytree(i.teacher, i.tmp / "teacher"))
        edit(folder)
        return cache_cmd(i, **{"teacher.model": folder})

    return argv


def drop_model_type(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    del config["model_type"]
    write(folder / "config.json", json.dumps(config))


def drop_eos(folder: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.eos_token = None
    tokenizer.save_pretrained(str(folder))


def with_config(text: str, command: str = "cache") -> Callable[[Inputs], list[str]]:
    return lambda i: [command, "--config", str(write(i.tmp / "bad.yaml", text))]


def run_cmd(rounds: list, *flags: str, **sections) -> Callable[[Inputs], list[str]]:
    """``distillery run`` of a small valid run config with these ``rounds`` (and other top-level ``sections``)."""
    def argv(i: Inputs) -> list[str]:
        config = {"run": {"dir": str(i.tmp / "run")}, "teacher": {"model": str(i.teacher)},
                  "data": {"path": str(i.corpus), "seq_len": 32, "holdout_fraction": 0.1},
                  "cache": {"root": str(i.tmp / "caches"), "mode": "topk", "top_k": 8}, "device": "cpu",
                  "train": {"steps": 2, "batch_size": 4}, "rounds": rounds, **sections}
        return ["run", "--config", str(write(i.tmp / "run.yaml", json.dumps(config))), *flags]

    return argv


def incomplete_cache(i: Inputs) -> list[str]:
    """Training on a copy of the shared cache whose shards and done records are there but not its manifest."""
    partial = Path(shutil.copytree(i.cache, i.tmp / "partial"))
    (partial / "manifest.json").unlink()
    return ["train", *train_args(partial, i.tmp / "o")]


def changed_config(i: Inputs) -> list[str]:
    """A second run into a trained ``train.out_dir`` with another loss and learning rate."""
    short = {"train.steps": 4, "train.checkpoint_every": 2, "train.eval_every": 2}
    train(train_args(i.cache, i.tmp / "o", **short))
    return train_cmd(i, **short, **{"loss.kind": "jsd", "train.lr": 0.002})


def damaged_state(i: Inputs) -> list[str]:
    """``distillery status`` of a copy of the shared run directory whose ``state.json`` was cut short."""
    run = Path(shutil.copytree(i.run, i.tmp / "run"))
    write(run / "state.json", '{"rounds": {"1": {"cache": {"status": "do')
    return ["status", str(run)]


def empty_dir(path: Path) -> Path:
    path.mkdir()
    return path


PATHS = {"empty-dir": lambda i: empty_dir(i.tmp / "empty"),
         "file": lambda i: write(i.tmp / "notes.txt", "mine"),
         "cache-dir": lambda i: i.cache, "run-dir": lambda i: i.run,
         "missing": lambda i: i.tmp / "no-such-dir"}
"""Every kind of path a directory argument may get; the shared cache and run folders are named so."""
NAMES = {"empty-dir": "empty", "file": "notes.txt", "cache-dir": "shared-cache", "run-dir": "shared-run",
         "missing": "no-such-dir"}
REASONS = {
    "run": {"empty-dir": "has no config.yaml", "file": "is a file", "cache-dir": "is a cache",
            "missing": "does not exist"},
    "cache": {"empty-dir": "no manifest.json", "file": "is a file", "run-dir": "no manifest.json",
              "missing": "does not exist"},
}
"""Why each wrong path is refused, by the kind of directory a command wants."""


def wrong_directories(command: str, wanted: str) -> list[Case]:
    """``command PATH`` on every kind of path but the ``wanted`` kind (``run`` or ``cache``)."""
    what = "a Distillery run directory" if wanted == "run" else "a complete Distillery cache"
    return [Case(f"{command}-{name}", lambda i, path=PATHS[name]: [command, str(path(i))],
                 (NAMES[name], reason, f"is not {what}"))
            for name, reason in REASONS[wanted].items()]


HIDDEN_30 = "{model_type: llama, hidden_size: 30, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 4}"
ROUND = {"student": {"config": yaml.safe_load(STUDENT)}}


def pretrained(i: Inputs) -> dict:
    """Train overrides that make the shared teacher a pretrained student."""
    return {"student.config": "null", "student.model": i.teacher}


CASES = [
    # stage 1: the teacher
    Case("missing-model-path", lambda i: cache_cmd(i, **{"teacher.model": i.tmp / "no-such-model"}),
         ("teacher.model", "no-such-model", "no such model directory"), CACHE_OUT),
    Case("teacher-config-invalid-json", with_teacher(lambda f: write(f / "config.json", "{not json")),
         ("teacher.model", "config.json", "is not a valid JSON file"), CACHE_OUT),
    Case("teacher-config-without-model-type", with_teacher(drop_model_type),
         ("teacher.model", "config.json", "model_type"), CACHE_OUT),
    Case("tokenizer-without-eos", with_teacher(drop_eos), ("tokenizer", "teacher", "no EOS token", "eos_token"),
         CACHE_OUT),
    Case("seq-len-beyond-max-positions", lambda i: cache_cmd(i, **{"data.seq_len": 4096}),
         ("data.seq_len: 4096 exceeds the teacher's maximum positions (256)",), CACHE_OUT),
    Case("top-k-beyond-vocab", lambda i: cache_cmd(i, **{"cache.top_k": 100000}),
         ("cache.top_k: 100000 exceeds the teacher's vocab size (512)",), CACHE_OUT),
    *bad_gguf_cases(Case, cache_cmd, CACHE_OUT),  # teacher.gguf_file and convert-gguf
    # stage 1: the data
    Case("text-field-not-found", lambda i: cache_cmd(i, **{"data.text_field": "body"}),
         ("data.text_field 'body'", "['text', 'id']"), CACHE_OUT),
    Case("empty-data-file", with_data("empty.jsonl", "", **{"data.holdout_fraction": 0.0}),
         ("data.path", "empty.jsonl is empty"), CACHE_OUT),
    Case("empty-documents", with_data("empty.jsonl", '{"text": ""}\n{"text": ""}\n', **{"data.holdout_fraction": 0.0}),
         ("empty.jsonl", "no tokens"), CACHE_OUT),
    Case("binary-data-file", with_data("data.bin", bytes(range(256)) * 8), ("data.path", "data.bin", ".jsonl"),
         CACHE_OUT),
    Case("binary-jsonl-file", with_data("data.jsonl", bytes(range(256)) * 8), ("data.path", "data.jsonl"), CACHE_OUT),
    Case("non-utf8-text-file", with_data("latin1.txt", "caf\u00e9 au lait\n".encode("latin-1") * 50),
         ("data.path", "latin1.txt", "UTF-8"), CACHE_OUT),
    Case("non-utf8-jsonl-file", with_data("latin1.jsonl", '{"text": "caf\u00e9"}\n'.encode("latin-1") * 50),
         ("data.path", "latin1.jsonl", "UTF-8"), CACHE_OUT),
    Case("missing-data-path", lambda i: cache_cmd(i, **{"data.path": i.tmp / "no-such.jsonl"}),
         ("data.path", "no-such.jsonl", "does not exist"), CACHE_OUT),
    Case("missing-eval-path", lambda i: cache_cmd(i, **{"data.eval_path": i.tmp / "no-eval.jsonl",
                                                       "data.holdout_fraction": 0.0}),
         ("data.eval_path", "no-eval.jsonl", "does not exist"), CACHE_OUT),
    # stage 1: values
    Case("seq-len-zero", lambda i: cache_cmd(i, **{"data.seq_len": 0}), ("data.seq_len: must be >= 2, got 0",), CACHE_OUT),
    Case("seq-len-negative", lambda i: cache_cmd(i, **{"data.seq_len": -8}), ("data.seq_len: must be >= 2, got -8",),
         CACHE_OUT),
    Case("samples-zero", lambda i: cache_cmd(i, **{"cache.mode": "sample", "cache.samples": 0}),
         ("cache.samples: must be >= 1, got 0",), CACHE_OUT),
    Case("samples-beyond-uint16", lambda i: cache_cmd(i, **{"cache.mode": "sample", "cache.samples": 70000}),
         ("cache.samples: must be at most 65535", "uint16"), CACHE_OUT),
    Case("format-version-unknown", lambda i: cache_cmd(i, **{"cache.format_version": 4}),
         ("cache.format_version: must be one of [2, 3], got 4",), CACHE_OUT),
    Case("eight-bit-sample-mode", lambda i: cache_cmd(i, **{"cache.mode": "sample", "cache.logprob_bits": 8}),
         ("cache.logprob_bits", "sample mode stores counts"), CACHE_OUT),
    Case("eight-bit-format-2", lambda i: cache_cmd(i, **{"cache.format_version": 2, "cache.logprob_bits": 8}),
         ("cache.logprob_bits", "format_version=3"), CACHE_OUT),
    Case("cache-temperature-negative", lambda i: cache_cmd(i, **{"cache.temperature": -1}),
         ("cache.temperature: must be > 0, got -1",), CACHE_OUT),
    Case("holdout-fraction-one", lambda i: cache_cmd(i, **{"data.holdout_fraction": 1.0}),
         ("data.holdout_fraction: must be in [0, 1), got 1.0",), CACHE_OUT),
    Case("holdout-fraction-negative", lambda i: cache_cmd(i, **{"data.holdout_fraction": -0.1}),
         ("data.holdout_fraction: must be in [0, 1), got -0.1",), CACHE_OUT),
    Case("cache-format-unknown", lambda i: cache_cmd(i, **{"cache.format": "parquet"}),
         ("cache.format: 'parquet' is not one of 'arrow' | 'zarr'",), CACHE_OUT),
    Case("cache-mode-unknown", lambda i: cache_cmd(i, **{"cache.mode": "dense"}),
         ("cache.mode: 'dense' is not one of",), CACHE_OUT),
    Case("cache-sampler-unknown", lambda i: cache_cmd(i, **{"cache.sampler": "stratified"}),
         ("cache.sampler: 'stratified' is not one of", "systematic"), CACHE_OUT),
    Case("cache-device-tpu", lambda i: cache_cmd(i, device="tpu"), ("device: must be auto, cpu, cuda or cuda:N, got 'tpu'",),
         CACHE_OUT),
    # stage 1: directories
    Case("unwritable-cache-dir", lambda i: cache_cmd(i, **{"cache.dir": write(i.tmp / "a-file", "x") / "cache"}),
         ("cache.dir", "a-file/cache", "not a writable directory"), untouched=(".",)),
    Case("foreign-cache-dir", lambda i: cache_cmd(i, **{"cache.dir": write(i.tmp / "c" / "notes.txt", "mine").parent}),
         ("is not empty and is not a Distillery cache",), untouched=CACHE_OUT),
    # config files and overrides
    Case("malformed-yaml", with_config("teacher: {model: x\ncache: ["),
         ("bad.yaml is not valid YAML: expected ',' or '}', but got ':' at line 2, column 6",)),
    Case("yaml-top-level-list", with_config("- teacher\n- data\n"), ("bad.yaml must hold a mapping of sections, not list",)),
    Case("unknown-top-level-section", lambda i: cache_cmd(i, **{"student.model": "x"}), ("student: unknown key",),
         CACHE_OUT),
    Case("problems-reported-together",
         lambda i: [*with_config("teacher:\n  model: m\n  dtyp: bf16\ndata:\n  path: d\n  seq_len: long\ncache:\n"
                                 "  dir: x\n  top_k: 0\n")(i), "cache.temperature=-1"],
         ("teacher.dtyp: unknown key (did you mean 'dtype'?)", "data.seq_len: expected int, got 'long'",
          "cache.top_k: must be >= 1, got 0", "cache.temperature: must be > 0")),
    Case("override-without-equals", lambda i: [*cache_cmd(i), "cache.top_k"],
         ("override 'cache.top_k' is not of the form section.key=value",), CACHE_OUT),
    Case("unknown-key", lambda i: cache_cmd(i, **{"cache.topk": 8}), ("cache.topk: unknown key (did you mean 'top_k'?)",),
         CACHE_OUT),
    Case("wrong-type", lambda i: cache_cmd(i, **{"cache.top_k": "many"}), ("cache.top_k: expected int, got 'many'",),
         CACHE_OUT),
    # stage 2
    Case("lr-negative", lambda i: train_cmd(i, **{"train.lr": -0.001}), ("train.lr: must be > 0, got -0.001",), TRAIN_OUT),
    Case("lr-zero", lambda i: train_cmd(i, **{"train.lr": 0}), ("train.lr: must be > 0, got 0",), TRAIN_OUT),
    Case("log-every-zero", lambda i: train_cmd(i, **{"train.log_every": 0}), ("train.log_every: must be >= 1, got 0",),
         TRAIN_OUT),
    Case("checkpoint-every-negative", lambda i: train_cmd(i, **{"train.checkpoint_every": -2}),
         ("train.checkpoint_every: must be >= 0 (0: none), got -2",), TRAIN_OUT),
    Case("phase-lr-zero", lambda i: train_cmd(i, **{"train.phases": "[{steps: 2, lr: 0}]"}),
         ("train.phases[0]: lr: must be > 0",), TRAIN_OUT),
    Case("loss-temperature-negative", lambda i: train_cmd(i, **{"loss.temperature": -2}),
         ("loss.temperature: must be > 0",), TRAIN_OUT),
    Case("student-hidden-not-divisible-by-heads", lambda i: train_cmd(i, **{"student.config": HIDDEN_30}),
         ("The hidden size (30) is not a multiple of the number of attention heads (4)",), TRAIN_OUT),
    Case("student-unknown-model-type", lambda i: train_cmd(i, **{"student.config": "{model_type: no_such_model}"}),
         ("student.config: model_type 'no_such_model' is not a transformers model type",), TRAIN_OUT),
    Case("batch-larger-than-cache", lambda i: train_cmd(i, **{"train.batch_size": 100000}),
         ("global batch of 100000", "lower train.batch_size"), TRAIN_OUT),
    Case("incomplete-cache", incomplete_cache, ("cache.dir", "no manifest.json in", "partial", "distillery cache"),
         TRAIN_OUT),
    Case("missing-eval-dir", lambda i: train_cmd(i, **{"cache.eval_dir": i.tmp / "no-such-cache"}),
         ("cache.eval_dir", "no-such-cache", "no manifest.json"), TRAIN_OUT),
    Case("draws-per-epoch-zero", lambda i: train_cmd(i, **{"cache.draws_per_epoch": 0}),
         ("cache.draws_per_epoch: must be >= 1 or null", "got 0"), TRAIN_OUT),
    Case("draws-per-epoch-on-topk-cache", lambda i: train_cmd(i, **{"cache.draws_per_epoch": 4}),
         ("cache.draws_per_epoch=4 needs a sample or hybrid cache", "is a topk cache"), TRAIN_OUT),
    Case("train-report-to-unknown", lambda i: train_cmd(i, **{"train.report_to": "[tensorbord]"}),
         ("train.report_to: unknown trackers ['tensorbord']", "choose from tensorboard, wandb, mlflow"), TRAIN_OUT),
    Case("train-device-tpu", lambda i: train_cmd(i, device="tpu"), ("device: must be auto, cpu, cuda or cuda:N, got 'tpu'",),
         TRAIN_OUT),
    Case("train-online-without-live-teacher",
         lambda i: train_cmd(i, **{"online.prompts": f"{{path: {i.corpus}}}"}),
         ("online: needs loss.teacher_live",), TRAIN_OUT),
    Case("train-online-prompt-beyond-positions",
         lambda i: train_cmd(i, **{"online.prompts": f"{{path: {i.corpus}}}", "online.max_new_tokens": 250,
                                   "loss.teacher_live": i.teacher, "student.config": "null",
                                   "student.model": i.teacher}),
         ("online.prompts.path: prompt 0 has", "online.max_new_tokens=250", "exceeds the model's 256 positions"),
         TRAIN_OUT),
    # students with another tokenizer
    Case("train-cross-tokenizer-without-its-loss", lambda i: train_cmd(i, **{"student.tokenizer": other_tokenizer(i)}),
         ("student.tokenizer", "differs from the tokenizer of cache", "set loss.cross_tokenizer=uld or gold"),
         TRAIN_OUT),
    Case("train-cross-tokenizer-on-a-cache-without-text", cross_tokenizer_on_old_cache,
         ("student.tokenizer", "a cache made without text alignment", "rebuild the cache"), TRAIN_OUT),
    Case("train-student-tokenizer-does-not-load",
         lambda i: train_cmd(i, **{"student.tokenizer": write(i.tmp / "tok" / "tokenizer.json", "{broken").parent}),
         ("student.tokenizer", "does not load as a tokenizer"), TRAIN_OUT),
    # LoRA students (refusals that need the student's weights loaded are in test_lora)
    Case("train-lora-on-a-random-init-student", lambda i: train_cmd(i, **{"student.lora": "{r: 4}"}),
         ("student.lora: adapts a pretrained student: set student.model",), TRAIN_OUT),
    Case("train-lora-rank-zero", lambda i: train_cmd(i, **{**pretrained(i), "student.lora": "{r: 0}"}),
         ("student.lora.r: must be >= 1, got 0",), TRAIN_OUT),
    Case("train-student-is-a-lora-adapter", lambda i: train_cmd(i, **{
        **pretrained(i), "student.model": write(i.tmp / "adapter" / "adapter_config.json", "{}").parent}),
         ("student.model", "adapter", "is a LoRA adapter folder", "student.lora.merge: true"), TRAIN_OUT),
    Case("changed-config-on-out-dir", changed_config,
         ('loss.kind: "forward_kl" -> "jsd"', "train.lr: 0.001 -> 0.002", "train.resume=never"), TRAIN_OUT,
         untouched=TRAIN_OUT),
    # the generation stage
    Case("generate-negative-temperature", lambda i: generate_cmd(i, **{"generate.temperature": -1}),
         ("generate.temperature: must be >= 0 (0 is greedy)", "got -1"), GENERATE_OUT),
    Case("generate-missing-model", lambda i: generate_cmd(i, **{"generate.model": i.tmp / "no-such-model"}),
         ("generate.model", "no-such-model", "no such model directory"), GENERATE_OUT),
    Case("generate-prompt-beyond-positions", lambda i: generate_cmd(i, **{"generate.max_new_tokens": 250}),
         ("data.path: prompt 0 has", "generate.max_new_tokens=250", "exceeds the model's 256 positions"), GENERATE_OUT),
    Case("generate-top-p-zero", lambda i: generate_cmd(i, **{"generate.top_p": 0}),
         ("generate.top_p: must be in (0, 1]", "got 0"), GENERATE_OUT),
    # stage 3
    Case("run-empty-rounds", run_cmd([]), ("rounds: needs at least one round",), RUN_OUT),
    Case("run-missing-round-teacher", run_cmd([{**ROUND, "teacher": {"model": "/no/such/teacher"}}]),
         ("teacher.model", "/no/such/teacher", "no such model directory"), RUN_OUT),
    Case("run-generate-by-nobody", run_cmd([{**ROUND, "generate": {"by": "nobody"}}]),
         ("rounds[0]", "generate.by: must be teacher or student", "'nobody'"), RUN_OUT),
    Case("run-generate-by-a-random-init-student", run_cmd([{**ROUND, "generate": {"by": "student"}}]),
         ("rounds[0]", "generate.by: student needs student.model"), RUN_OUT),
    Case("run-on-policy-without-a-start", run_cmd([], on_policy={"rounds": 2, "prompts_per_round": 4}),
         ("on_policy.student: is required when no round precedes",), RUN_OUT),
    Case("run-on-policy-zero-rounds", run_cmd([ROUND], on_policy={"rounds": 0, "prompts_per_round": 4}),
         ("on_policy.rounds: must be an integer >= 1, got 0",), RUN_OUT),
    Case("run-round-out-of-range", run_cmd([ROUND], "--round", "3"), ("--round 3", "1..1"), RUN_OUT),
    Case("run-damaged-state", damaged_state, ("run/state.json is not valid JSON", "delete it to redo every stage")),
    # distillery eval (lm-evaluation-harness); the missing extra and a hub task offline are in test_lm_eval
    Case("eval-unknown-task", lambda i: ["eval", "--model", str(i.teacher), "--tasks", "kjv_recitation,no_such_task"],
         ("--tasks: unknown lm-eval task no_such_task", "lm-eval ls tasks")),
    Case("eval-missing-model", lambda i: ["eval", "--model", str(i.tmp / "no-such-model")],
         ("--model", "no-such-model", "not a model folder")),
    Case("eval-run-with-nothing-trained", lambda i: ["eval", "--run", str(i.run)],
         ("--run", "shared-run", "no round has trained yet")),
    Case("eval-limit-zero", lambda i: ["eval", "--model", str(i.teacher), "--limit", "0"], ("--limit: must be >= 1",)),
    *wrong_directories("status", "run"),
    *wrong_directories("report", "run"),
    *wrong_directories("inspect", "cache"),
    *wrong_directories("verify", "cache"),
]
