"""GGUF teachers: ``teacher.gguf_file`` through stages 1 and 3, and ``distillery convert-gguf``, on a tiny Llama
written as a GGUF in the test (F32, llama.cpp names and q/k layout, tokenizer as metadata; see ``gguf_files``)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from gguf_files import write_gguf
from helpers import cache_args, read_all

from pipeline import cli
from pipeline.cache.config import CacheJob
from pipeline.cache.plan import make_plan
from pipeline.config_loading import load_config
from pipeline.errors import ConfigError
from pipeline.models import gguf as gguf_module
from pipeline.models.hf import load_config_and_tokenizer, load_model
from pipeline.rounds.config import RunJob, cache_job, previous_final
from storage.io.hashing import tree_sha256
from storage.manifest import read_manifest

pytest.importorskip("gguf")
NAME = "teacher.gguf"
TEXT = "In the beginning God created the heaven and the earth."


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory, llama_dir) -> Path:
    """A folder holding the conftest Llama as ``teacher.gguf``, and nothing else."""
    folder = tmp_path_factory.mktemp("gguf")
    write_gguf(llama_dir, folder / NAME)
    return folder


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_a_gguf_teacher_loads_as_the_model_it_was_written_from(gguf_dir, llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, tokenizer = load_config_and_tokenizer(str(gguf_dir), gguf_file=NAME)
    original = AutoTokenizer.from_pretrained(str(llama_dir))
    assert config.model_type == "llama" and config.vocab_size == len(original)
    assert tokenizer(TEXT).input_ids == original(TEXT).input_ids
    assert tokenizer.eos_token == original.eos_token and tokenizer.chat_template == original.chat_template
    model = load_model(str(gguf_dir), torch.device("cpu"), "fp32", gguf_file=NAME)
    source = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
    ids = original(TEXT).input_ids
    # The q/k rows were written permuted, as llama.cpp does; transformers undoes it, so nothing is lost.
    assert torch.equal(logits(model, ids), logits(source, ids))


def test_gguf_file_given_as_a_path_names_its_folder(gguf_dir, tmp_path):
    teacher = load_config(CacheJob, None, [f"teacher.gguf_file={gguf_dir / NAME}", f"cache.dir={tmp_path}",
                                           "data.path=x"]).teacher
    assert (Path(teacher.model), teacher.gguf_file) == (gguf_dir, NAME)
    same = load_config(CacheJob, None, [f"teacher.model={gguf_dir}", f"teacher.gguf_file={gguf_dir / NAME}",
                                        f"cache.dir={tmp_path}", "data.path=x"]).teacher
    assert (same.model, same.gguf_file) == (str(gguf_dir), NAME)
    with pytest.raises(ConfigError, match="teacher.gguf_file: .* is not in teacher.model"):
        load_config(CacheJob, None, [f"teacher.model={tmp_path}", f"teacher.gguf_file={gguf_dir / NAME}",
                                     f"cache.dir={tmp_path}", "data.path=x"])


def test_cache_with_a_gguf_teacher_matches_the_cache_of_its_source(gguf_dir, llama_dir, corpus_jsonl, tmp_path,
                                                                     capsys):
    small = {"data.max_tokens": 1024}
    gguf_args = cache_args(gguf_dir, corpus_jsonl, tmp_path / "gguf", **small, **{"teacher.gguf_file": NAME})
    assert cli.main(["cache", *gguf_args]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "gguf")
    assert cli.main(["cache", *cache_args(llama_dir, corpus_jsonl, tmp_path / "hf", **small)]) == 0
    manifest = read_manifest(tmp_path / "gguf")
    digest = tree_sha256(gguf_dir / NAME)
    assert manifest.teacher["gguf_file"] == NAME and manifest.teacher["weights_sha256"] == digest
    assert manifest.fingerprint_identity["teacher"] == {"weights_sha256": digest}
    assert manifest.fingerprint != read_manifest(tmp_path / "hf").fingerprint  # other weight bytes
    ours, theirs = read_all(tmp_path / "gguf"), read_all(tmp_path / "hf")
    assert ours.keys() == theirs.keys()
    for shard, arrays in ours.items():
        for name, values in arrays.items():
            assert (values == theirs[shard][name]).all(), f"{shard} {name}"
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(tmp_path / "gguf" / "tokenizer"))
    assert saved.chat_template and saved.chat_template == AutoTokenizer.from_pretrained(str(llama_dir)).chat_template


def test_the_fingerprint_covers_the_gguf_bytes(gguf_dir, corpus_jsonl, tmp_path):
    def fingerprint(folder: Path) -> str:
        args = cache_args(folder, corpus_jsonl, tmp_path / "cache", **{"teacher.gguf_file": NAME})
        return make_plan(load_config(CacheJob, None, args)).fingerprint

    copy = Path(shutil.copytree(gguf_dir, tmp_path / "copy"))
    assert fingerprint(copy) == fingerprint(gguf_dir)  # the bytes, not where they are
    data = bytearray((copy / NAME).read_bytes())
    data[-4] ^= 0x01  # one bit of the last weight (the tensors come after the metadata)
    (copy / NAME).write_bytes(bytes(data))
    assert fingerprint(copy) != fingerprint(gguf_dir)


def test_a_later_round_does_not_inherit_the_gguf_file(gguf_dir, llama_dir, corpus_jsonl, tmp_path):
    rounds = ("rounds=[{student: {config: {model_type: llama}}}, {student: {config: {model_type: llama}}},"
              f" {{teacher: {{model: {gguf_dir}}}, student: {{config: {{model_type: llama}}}}}},"
              f" {{teacher: {{model: {llama_dir}}}, student: {{config: {{model_type: llama}}}}}}]")
    job = load_config(RunJob, None, [f"run.dir={tmp_path / 'run'}", f"teacher.model={gguf_dir}",
                                     f"teacher.gguf_file={NAME}", f"data.path={corpus_jsonl}",
                                     f"cache.root={tmp_path / 'caches'}", rounds])
    teachers = [cache_job(job, index).teacher for index in range(1, 5)]
    assert (teachers[0].model, teachers[0].gguf_file) == (str(gguf_dir), NAME)
    assert (teachers[1].model, teachers[1].gguf_file) == (previous_final(job, 2), None)  # round 1's student
    assert (teachers[2].model, teachers[2].gguf_file) == (str(gguf_dir), NAME)  # the configured teacher again
    assert (teachers[3].model, teachers[3].gguf_file) == (str(llama_dir), None)  # another model


def test_convert_gguf_writes_a_folder_that_loads_as_the_gguf_model(gguf_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    assert cli.main(["convert-gguf", "--model", str(gguf_dir / NAME), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert (out / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    converted = AutoModelForCausalLM.from_pretrained(str(out))
    assert converted.dtype == torch.float32
    gguf_model = load_model(str(gguf_dir), torch.device("cpu"), "fp32", gguf_file=NAME)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=NAME).chat_template
    ids = tokenizer(TEXT).input_ids
    assert torch.equal(logits(converted, ids), logits(gguf_model, ids))
    # the folder and file name form; an existing --out only with --overwrite; never the GGUF's own folder
    args = ["convert-gguf", "--model", str(gguf_dir), "--gguf-file", NAME, "--out", str(out)]
    assert cli.main(args) == 2
    assert cli.main([*args, "--overwrite"]) == 0
    assert cli.main(["convert-gguf", "--model", str(gguf_dir), "--out", str(gguf_dir), "--overwrite"]) == 2
    assert "holds the GGUF being converted" in capsys.readouterr().err
    assert (gguf_dir / NAME).is_file()


@pytest.mark.parametrize("command", ["cache", "convert-gguf"])
def test_gguf_without_the_gguf_package_exits_2_with_one_line(command, gguf_dir, corpus_jsonl, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.setattr(gguf_module, "_gguf_version", lambda: None)
    argv = (["cache", *cache_args(gguf_dir, corpus_jsonl, tmp_path / "c", **{"teacher.gguf_file": NAME})]
            if command == "cache" else ["convert-gguf", "--model", str(gguf_dir), "--out", str(tmp_path / "o")])
    assert cli.main(["-q", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "needs the gguf package, which is not installed: pip install 'gguf>=" in lines[0]
    assert not (tmp_path / "c" / "manifest.json").exists() and not (tmp_path / "o").exists()


def test_a_run_with_a_gguf_teacher_reports_the_kl_to_it(gguf_dir, llama_dir, corpus_jsonl, tmp_path):
    """The report scores the student against the teacher read from its GGUF file: the same KL as against the
    model that the file was written from."""
    from helpers import STUDENT

    from pipeline.train.evaluate import score_against_teacher

    run = tmp_path / "run"
    overrides = [f"run.dir={run}", f"teacher.model={gguf_dir}", f"teacher.gguf_file={NAME}",
                 f"data.path={corpus_jsonl}", "data.seq_len=32", "data.holdout_fraction=0.1", "device=cpu",
                 f"cache.root={tmp_path / 'caches'}", "cache.mode=topk", "cache.top_k=8", "train.steps=2",
                 "train.batch_size=4", "train.eval_every=0", "train.checkpoint_every=0",
                 f"rounds=[{{student: {{config: {STUDENT}}}}}]"]
    assert cli.main(["run", *overrides]) == 0
    row = json.loads((run / "report.json").read_text())[0]
    cache_dir = json.loads((run / "round-1" / "cache.json").read_text())["dir"]
    expected = score_against_teacher(run / "round-1" / "train" / "final", llama_dir, cache_dir)
    assert row["KL to teacher"] == pytest.approx(expected["kl"], rel=1e-4) and row["top-1"] == expected["top1"]
