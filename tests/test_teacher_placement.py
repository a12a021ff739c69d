"""Teachers placed by ``teacher.device_map`` or split by tensor parallelism write the caches a plain teacher writes."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import cache, cache_args, read_all

from pipeline.cache.config import TeacherConfig
from pipeline.errors import ConfigError


@pytest.fixture(scope="module")
def plain(tmp_path_factory, llama_dir, corpus_jsonl):
    return cache(cache_args(llama_dir, corpus_jsonl, tmp_path_factory.mktemp("plain") / "c")).directory


def test_device_map_auto_writes_the_same_shards(tmp_path, plain, llama_dir, corpus_jsonl):
    """On a CPU-only machine accelerate maps every layer to the CPU: the code path that skips ``.to(device)`` and
    sends inputs to the embeddings' device must give bitwise the same cache."""
    mapped = cache(cache_args(llama_dir, corpus_jsonl, tmp_path / "c", **{"teacher.device_map": "auto"})).directory
    a, b = read_all(plain), read_all(mapped)
    assert a.keys() == b.keys()
    for path in a:
        for field in a[path]:
            assert np.array_equal(a[path][field], b[path][field]), (path, field)


def test_tensor_parallel_teacher_matches_one_process(tmp_path, plain, llama_dir, corpus_jsonl):
    """Two torchrun ranks share one teacher (``tp_plan: auto`` over gloo) and form one part; rank 0 writes. Sums in
    another order move log-probs by float noise, which can swap near-tied ids, so ids are compared as sets."""
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pipeline.cli",
         "cache", *cache_args(llama_dir, corpus_jsonl, tmp_path / "tp", **{"teacher.parallel": "tensor"})],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "part 0/1" in run.stderr and "part 1/" not in run.stderr and "tensor parallel: 2 ranks" in run.stderr
    ours, theirs = read_all(tmp_path / "tp"), read_all(plain)
    assert ours.keys() == theirs.keys()
    same_ids = total = 0
    for path, shard in ours.items():
        reference = theirs[path]
        assert np.array_equal(shard["input_ids"], reference["input_ids"])
        np.testing.assert_allclose(np.sort(shard["topk_logprobs"].astype(np.float32), -1),
                                   np.sort(reference["topk_logprobs"].astype(np.float32), -1), atol=5e-3)  # 1 fp16 step
        np.testing.assert_allclose(shard["tail_logprob"], reference["tail_logprob"], atol=1e-3)
        same_ids += sum(set(a) == set(b) for a, b in zip(shard["topk_ids"].reshape(-1, 8).tolist(),
                                                          reference["topk_ids"].reshape(-1, 8).tolist()))
        total += shard["topk_ids"].reshape(-1, 8).shape[0]
    assert same_ids / total > 0.99


@pytest.mark.parametrize("fields,message", [
    ({"gpus_per_part": 2}, "gpus_per_part: above 1 needs teacher.device_map"),
    ({"device_map": "auto", "parallel": "tensor"}, "parallel: tensor parallelism places the weights itself"),
])
def test_placement_settings_that_cannot_work_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        TeacherConfig(model="m", **fields)
