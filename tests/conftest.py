"""Shared fixtures: a small BPE tokenizer, tiny random teachers and text files, all built locally."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import skip_marked

from pipeline.demo.init_model import build_model
from pipeline.demo.tokenizer import build_tokenizer, corpus_texts

VOCAB = 512
# moto reads this when it is first imported, by whichever test that is (the bench's S3 section, say): parts of
# a few KB, so that multipart uploads can be tested on small files.
os.environ.setdefault("S3_UPLOAD_PART_MIN_SIZE", "256")
# `auto` dtypes resolve to fp32 in every test and every subprocess a test starts, whatever the CPU: the suite
# computes alike on machines with and without native bf16. tests/test_dtype.py patches the check itself.
os.environ["DISTILLERY_NATIVE_BF16"] = "0"


BENCH_SMOKE = os.environ.get("BENCH_SMOKE") == "1"


def pytest_collection_modifyitems(config, items):
    if not BENCH_SMOKE:
        skip_marked(items, "bench_smoke", "BENCH_SMOKE=1 only: `make bench-smoke` runs it")


@pytest.fixture(autouse=True)
def default_verbosity():
    """Each test starts at the default log level: ``-q`` or ``-v`` given to an earlier ``cli.main`` stays set
    in the process otherwise, and would hide the info messages a later test looks for."""
    from pipeline.log import set_verbosity

    set_verbosity(0)


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



@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on a free loopback port, reached through the standard AWS environment only."""
    from pipeline.bench.remote_read import s3_server

    with s3_server(key_id="testing-key-id", secret="testing-secret") as endpoint:
        yield endpoint


@pytest.fixture
def bucket(s3_endpoint, request) -> str:
    """A new, empty bucket for one test."""
    import re
    import uuid

    import fsspec

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:6]
    fsspec.filesystem("s3", use_listings_cache=False).mkdir(name)
    return f"s3://{name}"
