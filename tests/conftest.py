"""Shared fixtures: a small BPE tokenizer, tiny random teachers and text files, all built locally."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.demo.init_model import build_model
from pipeline.demo.tokenizer import build_tokenizer, corpus_texts

VOCAB = 512


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distillery")


@pytest.fixture(scope="session")
def tokenizer_dir(workdir) -> Path:
    return build_tokenizer(workdir / "tokenizer", vocab_size=VOCAB, limit_bytes=300_000)


@pytest.fixture(scope="session")
def llama_dir(workdir, tokenizer_dir) -> Path:
    return build_model(tokenizer_dir, workdir / "llama", arch="llama", hidden=32, layers=2, heads=4, max_positions=256)


@pytest.fixture(scope="session")
def gpt2_dir(workdir, tokenizer_dir) -> Path:
    return build_model(tokenizer_dir, workdir / "gpt2", arch="gpt2", hidden=32, layers=2, heads=4, max_positions=256)


@pytest.fixture(scope="session")
def corpus_jsonl(workdir) -> Path:
    """About 40 KB of text in 30 documents."""
    path = workdir / "docs.jsonl"
    texts = list(corpus_texts(limit_bytes=40_000))
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path

