"""The run report (``distillery report``): models named (a GGUF-converted teacher by its ``general.name``), the
training curves, what each model writes on held-out prompts, lm-eval scores, and a self-contained HTML page."""
from __future__ import annotations

import gzip
import html
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import yaml
from gguf_files import write_gguf

from pipeline import cli
from pipeline.demo.tokenizer import QA_CORPUS
from pipeline.rounds import continuations as continuations_module
from pipeline.rounds.report import build_report
from pipeline.rounds.report_models import model_name

pytest.importorskip("gguf")
STUDENT = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 2}
GGUF_NAME = "distillery test llama"
"""The ``general.name`` that ``gguf_files.write_gguf`` writes."""


@pytest.fixture(scope="module")
def report_run(tmp_path_factory, llama_dir, corpus_jsonl) -> Path:
    """A 2-round run (text, then chat) whose teacher is a folder that ``convert-gguf`` wrote from a GGUF."""
    root = tmp_path_factory.mktemp("report")
    write_gguf(llama_dir, root / "teacher.gguf")
    assert cli.main(["convert-gguf", "--model", str(root / "teacher.gguf"), "--out", str(root / "teacher-hf")]) == 0
    chat = root / "chat.jsonl"
    with gzip.open(QA_CORPUS, "rt") as source:
        chat.write_text("".join(next(source) for _ in range(40)))
    config = {"run": {"dir": str(root / "run")}, "teacher": {"model": str(root / "teacher-hf")},
              "data": {"path": str(corpus_jsonl), "seq_len": 32, "holdout_fraction": 0.3, "max_tokens": 3000,
                       "eval_max_tokens": 512},
              "cache": {"root": str(root / "caches"), "mode": "topk", "top_k": 4, "shard_size": 16},
              "train": {"steps": 4, "batch_size": 4, "checkpoint_every": 0, "eval_every": 2, "eval_batches": 2,
                        "log_every": 1, "warmup_steps": 1},
              "rounds": [{"student": {"config": STUDENT}},
                         {"teacher": {"model": str(root / "teacher-hf")}, "student": {"config": STUDENT},
                          "data": {"path": str(chat), "format": "chat", "seq_len": 64, "holdout_fraction": 0.2}}],
              "device": "cpu"}
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["run", "--config", str(root / "run.yaml")]) == 0
    return root / "run"


def table_rows(markdown: str, first_header: str) -> list[list[str]]:
    """The rows of every table of ``markdown`` whose header starts with ``| first_header |``, header first, the
    cells as the report's texts (unescaped)."""
    rows, inside = [], False
    for line in markdown.splitlines():
        if line.startswith(f"| {first_header} |"):
            inside = True
        elif not line.startswith("|"):
            inside = False
        if inside and not line.startswith("|---"):
            cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])  # pipes in a cell are escaped
            rows.append([html.unescape(c.strip().replace("\\|", "|").replace("<br>", "\n")) for c in cells])
    return rows


def test_convert_gguf_records_the_name_and_the_report_names_every_model(report_run, tmp_path):
    recorded = json.loads((report_run.parent / "teacher-hf" / "gguf_source.json").read_text())
    assert recorded["general.name"] == GGUF_NAME and recorded["gguf_file"] == "teacher.gguf"
    models = table_rows((report_run / "report.md").read_text(), "model")
    rows = json.loads((report_run / "report.json").read_text())
    teacher = report_run.parent / "teacher-hf"
    assert models[1] == ["teacher", f"{GGUF_NAME}, converted from teacher.gguf", f"`{teacher}`",
                         f"{sum(p.numel() for p in _load(teacher)[0].parameters()):,}"]
    for index in (1, 2):
        final = report_run / f"round-{index}" / "train" / "final"
        assert models[1 + index] == [f"round {index} student", "llama, 1 layer, hidden 16", f"`{final}`",
                                     f"{rows[index - 1]['student params']:,}"]
    # A teacher loaded from the GGUF itself is named from the file's header.
    (tmp_path / "g").mkdir()
    write_gguf(report_run.parent / "teacher-hf", tmp_path / "g" / "t.gguf")
    assert model_name(str(tmp_path / "g"), "t.gguf", str(tmp_path / "g")) == f"{GGUF_NAME}, from t.gguf"


def _load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))


def test_the_curves_plot_loss_and_held_out_kl_over_the_steps(report_run):
    report = (report_run / "report.md").read_text()
    assert "![curves.png](curves.png)" in report and "![kl.png](kl.png)" in report
    assert (report_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evals = [json.loads(line) for line in (report_run / "round-1" / "train" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert [e["step"] for e in evals] == [2, 4] and all(e["kl"] > 0 for e in evals)  # two points on the KL panel


def test_every_model_continues_three_held_out_prompts_greedily(report_run, monkeypatch):
    report = (report_run / "report.md").read_text()
    tables = table_rows(report, "prompt")
    headers = [i for i, row in enumerate(tables) if row[0] == "prompt"]
    assert len(headers) == 2  # the text round's prompts, then the chat round's
    labels = ["teacher", "round 1 student", "round 2 student"]
    text, chat = tables[headers[0]:headers[1]], tables[headers[1]:]
    assert text[0] == ["prompt", *labels] and chat[0] == ["prompt", "reference", *labels]
    assert [len(t) - 1 for t in (text, chat)] == [3, 3] and all(all(row) and "–" not in row for row in text + chat)
    # The teacher's first text continuation is what transformers' own greedy generate writes.
    model, tokenizer = _load(report_run.parent / "teacher-hf")
    ids = tokenizer(text[1][0], add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert text[1][1] == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    kept = json.loads((report_run / "continuations.json").read_text())["continuations"]
    assert sorted(entry["model"] for entry in kept.values()) == sorted(labels * 2)
    assert {entry["texts"][0] for entry in kept.values() if entry["rounds"] == [1]} == set(text[1][1:])


class Sources(HTMLParser):
    """Every tag and its attributes."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_report_html_is_self_contained(report_run):
    page = (report_run / "report.html").read_text()
    parser = Sources()
    parser.feed(page)
    parser.close()
    images = [attrs["src"] for tag, attrs in parser.tags if tag == "img"]
    assert len(images) == 2 and all(src.startswith("data:image/png;base64,") for src in images)
    linked = [v for _, attrs in parser.tags for k, v in attrs.items() if k in ("src", "href") and v]
    assert not [v for v in linked if "://" in v or not v.startswith("data:")]
    assert not [tag for tag, _ in parser.tags if tag in ("link", "script", "iframe")]
    assert "<style>" in page and GGUF_NAME in page and "What the models write" in page


def test_lm_eval_scores_appear_and_a_rerender_decodes_nothing_again(report_run, monkeypatch):
    assert "lm-eval" not in (report_run / "report.md").read_text()  # no lm_eval.json yet: no section
    scores = {"model": "round-1/train/final", "tasks": {"hellaswag": {"acc,none": 0.3125, "acc_stderr,none": 0.02,
                                                                      "acc_norm,none": 0.34375},
                                                        "arc_easy": {"acc": 0.5}},
              "limit": 32, "num_fewshot": None, "lm_eval_version": "0.4.9"}
    (report_run / "round-1" / "train" / "lm_eval.json").write_text(json.dumps(scores))
    (report_run / "round-2" / "train" / "lm_eval.json").write_text("{not json")
    kept = (report_run / "continuations.json").read_text()
    # Re-rendering reuses the kept continuations: nothing is decoded again.
    monkeypatch.setattr(continuations_module, "_write", lambda *a: pytest.fail("decoded again"))
    try:
        build_report(report_run)
    finally:
        for index in (1, 2):
            (report_run / f"round-{index}" / "train" / "lm_eval.json").unlink()
    rows = table_rows((report_run / "report.md").read_text(), "round")
    start = rows.index(["round", "hellaswag (acc_norm)", "arc_easy (acc)", "limit", "few-shot"])
    assert rows[start + 1:] == [["1", "0.344", "0.500", "32", "–"]]  # round 2's unreadable file: no row
    assert (report_run / "continuations.json").read_text() == kept


def test_only_a_changed_model_is_decoded_again(report_run, monkeypatch):
    decoded, write = [], continuations_module._write

    def recorded(speaker, *args):
        decoded.append(speaker.label)
        return write(speaker, *args)

    monkeypatch.setattr(continuations_module, "_write", recorded)
    weights = report_run / "round-2" / "train" / "final" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))  # as if saved again
    build_report(report_run)
    assert decoded == ["round 2 student"]
