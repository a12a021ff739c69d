"""``distillery generate``: plan, return at once when the folder is complete, else write this part's shards.

The flow matches stage 1's: the prompts and the fingerprint are fixed before any weights load; each part (a
torchrun rank of a Slurm array task) writes the shards it owns that have no valid done record, each shard whole
and atomic, and the last part to finish writes the manifest. A killed job rerun writes only what is missing, and
the rows are the same whatever the number of parts or restarts: every row draws from its own seed.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline.config_loading import to_yaml
from pipeline.dist import world
from pipeline.generate.config import GenerateJob
from pipeline.generate.plan import GeneratePlan, make_plan
from pipeline.generate.rows import rows_table, write_rows
from pipeline.log import get_logger, progress_bars
from pipeline.models.decode import decode, row_seed, stop_and_pad
from pipeline.models.device import dtype_choice, resolve_device
from pipeline.models.hf import load_model
from storage import (
    MANIFEST_NAME,
    ShardPlan,
    num_parts,
    part_index,
    read_folder_manifest,
    shards_of_part,
    write_folder_manifest,
)

log = get_logger("generate")


@dataclass
class GenerateResult:
    directory: Path | str
    """The generation folder: a local path, or a URL."""
    hit: bool
    shards_written: int
    complete: bool
    """Whether the manifest is written (by this part or another)."""
    score: dict | None = None
    """The manifest's task score of the rows that have references, once complete."""


def run_generate(job: GenerateJob, num_tasks: int = 1, task_index: int = 0) -> GenerateResult:
    """Run (or resume) this process's part of the generation; write the manifest when every part is done."""
    here = world()
    plan = make_plan(job)
    folder = plan.folder
    if folder.begin(to_yaml(job)):  # a hit: the manifest is pulled into the working copy
        log.info(f"hit: {plan.directory} already holds generation {plan.fingerprint}; nothing to generate")
        return GenerateResult(plan.directory, True, 0, True, _score(folder))
    parts = num_parts(num_tasks, here.size)
    part = part_index(task_index, num_tasks, here.rank, here.size)
    lock = folder.part_lock(part, parts, lambda holder: log.warning(
        f"part {part}/{parts} of {plan.directory} is held by {holder}; waiting for it"))
    try:
        written = _write_part(plan, part, parts)
    finally:
        lock.release()
    missing = folder.missing(plan.shards)
    if missing:
        log.info(f"{len(missing)} shards are still being written by other parts; the last to finish writes the manifest")
        return GenerateResult(plan.directory, False, written, False)
    if folder.finish(plan.shards, lambda shards: write_folder_manifest(folder.path, plan.manifest(shards), shards)):
        log.info(f"wrote the manifest of {len(plan.shards)} shards ({len(plan.prompts)} prompts) in {plan.directory}")
    score = _score(folder)
    if score:
        log.info(f"task score over the {score['scored']} rows with a reference: exact match "
                 f"{score['exact_match']:.3f}, chrF {score['chrf']:.3f}")
    return GenerateResult(plan.directory, False, written, True, score)


def _score(folder) -> dict | None:
    """The task score the finished folder's manifest records (pulled first: another part may have written it)."""
    folder.mirror.pull(MANIFEST_NAME)
    return read_folder_manifest(folder.path)[0].get("score")


def _write_part(plan: GeneratePlan, part: int, parts: int) -> int:
    """Write the shards of this part that have no valid done record; return how many."""
    folder = plan.folder
    mine = [plan.shards[i] for i in shards_of_part(len(plan.shards), part, parts)]
    todo, damaged = folder.unfinished(mine)
    for problem in damaged:
        log.warning(f"{problem}; not trusted: the shard is written again")
    for shard in todo:
        folder.discard(shard)
    log.info(f"part {part}/{parts}: {len(mine)} shards, {len(mine) - len(todo)} already complete, {len(todo)} to write")
    if not todo:
        return 0
    g = plan.job.generate
    device = resolve_device(plan.job.device, world().local_rank)
    model = load_model(g.model, device, g.dtype, g.revision, g.trust_remote_code, key="generate.model",
                       local_dir=g.local_dir, gguf_file=g.gguf_file)
    log.info(f"model loaded, computing in {dtype_choice(g.dtype, plan.dtype, device)}")
    rows = sum(s.count for s in todo) * g.samples_per_prompt
    with tqdm(total=rows, unit="row", desc=f"generate (part {part})", file=sys.stderr,
              disable=not progress_bars()) as bar:
        for shard in todo:
            _write_shard(plan, model, shard, bar)
    return len(todo)


def _write_shard(plan: GeneratePlan, model, shard: ShardPlan, bar: tqdm) -> None:
    """Decode one shard's rows batch by batch, write them, then the shard's done record."""
    g, tokenizer = plan.job.generate, plan.tokenizer
    prompts = plan.prompts[shard.start : shard.start + shard.count]
    rows = [(p, s) for p in prompts for s in range(g.samples_per_prompt)]
    eos_ids, pad = stop_and_pad(model, tokenizer)
    completions = []
    for lo in range(0, len(rows), g.batch_size):
        batch = rows[lo : lo + g.batch_size]
        completions += decode(model, [p.ids for p, _ in batch], [row_seed(g.seed, p.index, s) for p, s in batch],
                              plan.sampling, eos_ids, pad)
        bar.update(len(batch))
    text = tokenizer.batch_decode([c.ids for c in completions], skip_special_tokens=True)
    folder = plan.folder
    write_rows(folder.path / shard.name, rows_table(prompts, completions, g.samples_per_prompt, text,
                                                    plan.job.data.format == "chat"))
    folder.mark_done(shard, folder.record(shard, sum(len(c.ids) for c in completions)))
