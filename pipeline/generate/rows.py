"""The rows of a generation folder: one Parquet shard per plan entry, written atomically, with the cache's protocol.

A row is one completion of one prompt:

* ``prompt_index`` int64, ``sample_index`` int32: which prompt, and which of its samples;
* ``messages`` (chat: the prompt turns plus the generated assistant turn), or ``prompt`` and ``response``;
* ``reference`` string, when the source has one (null otherwise);
* ``prompt_ids`` list<int32>: the exact tokens the model was given;
* ``completion_ids`` list<int32>, ending with the EOS when the model stopped there;
* ``completion_logprobs`` list<float32>: the generating model's log-prob of each token, at temperature 1, no top-p;
* ``finish_reason`` string: ``eos`` or ``length``.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.prompts import Prompt
from pipeline.generate.score import task_score
from pipeline.models.decode import Completion
from storage import ShardFolder, ShardRecord, atomic_write

SUFFIX = ".parquet"
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


class GenerationFolder(ShardFolder):
    """A folder of generated rows (or a URL, through its local working copy) of one fingerprint."""

    key = "generate.out_dir"
    what = "a Distillery generation folder"


def rows_table(prompts: list[Prompt], completions: list[Completion], samples: int, text: list[str],
               chat: bool) -> pa.Table:
    """The rows of ``prompts`` (each repeated ``samples`` times, in order) with their completions and the
    completions' decoded ``text``."""
    rows = [(prompt, s) for prompt in prompts for s in range(samples)]
    columns = {"prompt_index": pa.array([p.index for p, _ in rows], pa.int64()),
               "sample_index": pa.array([s for _, s in rows], pa.int32())}
    if chat:
        columns["messages"] = pa.array([[*p.source["messages"], {"role": "assistant", "content": t}]
                                        for (p, _), t in zip(rows, text)], MESSAGES)
    else:
        columns["prompt"] = pa.array([p.source["prompt"] for p, _ in rows], pa.string())
        columns["response"] = pa.array(text, pa.string())
    columns |= {
        "reference": pa.array([p.reference for p, _ in rows], pa.string()),
        "prompt_ids": pa.array([list(p.ids) for p, _ in rows], pa.list_(pa.int32())),
        "completion_ids": pa.array([c.ids for c in completions], pa.list_(pa.int32())),
        "completion_logprobs": pa.array([c.logprobs for c in completions], pa.list_(pa.float32())),
        "finish_reason": pa.array([c.finish_reason for c in completions], pa.string()),
    }
    return pa.table(columns)


def rows_score(folder: GenerationFolder, shards: list[ShardRecord], chat: bool) -> dict | None:
    """The task score (``pipeline.generate.score``) of every row that has a reference, read back from its shards
    (a folder at a URL: from the destination, one shard at a time)."""
    answers, references = [], []
    for shard in shards:
        folder.mirror.pull(shard.path)
        table = pq.read_table(folder.path / shard.path, columns=["messages" if chat else "response", "reference"])
        folder.mirror.release(shard.path)
        text = [m[-1]["content"] for m in table.column("messages").to_pylist()] if chat \
            else table.column("response").to_pylist()
        answers += text
        references += table.column("reference").to_pylist()
    return task_score(answers, references)


def write_rows(path: Path, table: pa.Table) -> None:
    """One shard, atomically: readers and resumes never see part of it."""
    with atomic_write(path) as tmp:
        pq.write_table(table, str(tmp), compression="zstd")
