"""Bad input fails early with a message naming the file, key or value, and nothing is marked complete."""
from __future__ import annotations

import pytest
from helpers import cache_args

from pipeline import cli


def run_cli(capsys, args: list[str]) -> str:
    assert cli.main(["cache", *args]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


def assert_nothing_complete(directory):
    assert not (directory / "manifest.json").exists()
    assert not list(directory.glob("*.done.json"))  # glob of a missing directory is empty


def test_missing_model_path(tmp_path, corpus_jsonl, capsys):
    err = run_cli(capsys, cache_args(tmp_path / "no-such-model", corpus_jsonl, tmp_path / "c"))
    assert "teacher.model" in err and "no-such-model" in err and "no such model directory" in err
    assert_nothing_complete(tmp_path / "c")


def test_text_field_not_found(tmp_path, llama_dir, corpus_jsonl, capsys):
    err = run_cli(capsys, cache_args(llama_dir, corpus_jsonl, tmp_path / "c", **{"data.text_field": "body"}))
    assert "data.text_field 'body'" in err and "['text', 'id']" in err
    assert_nothing_complete(tmp_path / "c")


@pytest.mark.parametrize("content", ["", '{"text": ""}\n{"text": ""}\n'])
def test_empty_dataset(tmp_path, llama_dir, capsys, content):
    data = tmp_path / "empty.jsonl"
    data.write_text(content)
    err = run_cli(capsys, cache_args(llama_dir, data, tmp_path / "c", **{"data.holdout_fraction": 0.0}))
    assert "empty.jsonl" in err and ("empty" in err or "no tokens" in err)
    assert_nothing_complete(tmp_path / "c")


def test_seq_len_beyond_max_positions(tmp_path, llama_dir, corpus_jsonl, capsys):
    err = run_cli(capsys, cache_args(llama_dir, corpus_jsonl, tmp_path / "c", **{"data.seq_len": 4096}))
    assert "data.seq_len: 4096 exceeds the teacher's maximum positions (256)" in err
    assert_nothing_complete(tmp_path / "c")


def test_top_k_larger_than_vocab(tmp_path, llama_dir, corpus_jsonl, capsys):
    err = run_cli(capsys, cache_args(llama_dir, corpus_jsonl, tmp_path / "c", **{"cache.top_k": 100000}))
    assert "cache.top_k: 100000 exceeds the teacher's vocab size (512)" in err
    assert_nothing_complete(tmp_path / "c")


def test_unwritable_directory(tmp_path, llama_dir, corpus_jsonl, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    err = run_cli(capsys, cache_args(llama_dir, corpus_jsonl, blocker / "cache"))
    assert "cache.dir" in err and "a-file/cache" in err and "not a writable directory" in err


def test_non_cache_directory_is_refused(tmp_path, llama_dir, corpus_jsonl, capsys):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    err = run_cli(capsys, cache_args(llama_dir, corpus_jsonl, tmp_path / "c"))
    assert "is not empty and is not a Distillery cache" in err
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["notes.txt"]


def test_malformed_config_file(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("teacher: {model: x\ncache: [")
    err = run_cli(capsys, ["--config", str(config)])
    assert "bad.yaml is not valid YAML" in err


def test_config_problems_are_reported_together(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("teacher:\n  model: m\n  dtyp: bf16\ndata:\n  path: d\n  seq_len: long\ncache:\n  dir: x\n  top_k: 0\n")
    err = run_cli(capsys, ["--config", str(config), "cache.temperature=-1"])
    for part in ("teacher.dtyp: unknown key (did you mean 'dtype'?)", "data.seq_len: expected int, got 'long'",
                 "cache.top_k: must be >= 1, got 0", "cache.temperature: must be > 0"):
        assert part in err


@pytest.mark.parametrize("student,message", [
    ("{model_type: llama, hidden_size: 30, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 4}",
     "The hidden size (30) is not a multiple of the number of attention heads (4)"),
    ("{model_type: no_such_model}", "student.config: model_type 'no_such_model' is not a transformers model type"),
])
def test_student_configs_that_cannot_build(tmp_path, llama_dir, corpus_jsonl, capsys, student, message):
    from helpers import cache, train_args

    directory = cache(cache_args(llama_dir, corpus_jsonl, tmp_path / "c", **{"data.seq_len": 32})).directory
    capsys.readouterr()
    assert cli.main(["train", *train_args(directory, tmp_path / "o", **{"student.config": student})]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o" / "final").exists()
