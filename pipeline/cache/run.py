"""Stage 1, ``distillery cache``: plan, return at once on a cache hit, else run this part's shards and finalize.

The flow: load the teacher's config and tokenizer, pack the data, compute the
fingerprint, and return at once on a cache hit. Otherwise load the weights
and write the shards this process owns (``teacher_pass``). The last part to
finish assembles the manifest.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.cache.config import CacheJob
from pipeline.cache.plan import make_plan
from pipeline.cache.teacher_pass import load_teacher, write_shards
from pipeline.config_loading import to_yaml
from pipeline.dist import world
from pipeline.log import get_logger
from pipeline.models.device import resolve_device
from storage import CacheNotFoundError, num_parts, part_index, shards_of_part

log = get_logger("cache")


@dataclass
class CacheResult:
    directory: Path | str
    """The cache's location: a local path, or a URL."""
    hit: bool
    shards_written: int
    complete: bool
    """Whether the manifest is written (by this part or another)."""


def run_cache(job: CacheJob, num_tasks: int = 1, task_index: int = 0, finalize_only: bool = False) -> CacheResult:
    """Run (or resume) this process's part of the cache; assemble the manifest when all parts are done."""
    here = world()
    plan = make_plan(job)
    cache = plan.cache
    if cache.begin(to_yaml(job)):
        log.info(f"cache hit: {plan.directory} already holds fingerprint {plan.fingerprint}; no teacher work needed")
        return CacheResult(plan.directory, True, 0, True)
    written = 0
    # Under tensor parallelism all ranks of the job run one teacher together: they form one part, rank 0 writes.
    ranks_per_part = here.size if job.teacher.parallel == "tensor" else 1
    writer = here.rank % ranks_per_part == 0
    if ranks_per_part > 1:
        log.info(f"tensor parallel: {ranks_per_part} ranks run one teacher; rank {here.rank - here.rank % ranks_per_part} "
                 "writes its shards")
    if not finalize_only:
        parts = num_parts(num_tasks, here.size // ranks_per_part)
        part = part_index(task_index, num_tasks, here.rank // ranks_per_part, here.size // ranks_per_part)
        lock = cache.part_lock(part, parts, lambda holder: log.warning(
            f"part {part}/{parts} of {plan.directory} is held by {holder}; waiting for it")) if writer else None
        try:
            written = _write_part(job, plan, part, parts, writer)
        finally:
            if lock is not None:
                lock.release()
    if not writer:
        return CacheResult(plan.directory, False, written, False)
    missing = cache.missing(plan.shards)
    if missing:
        if finalize_only:
            raise CacheNotFoundError(f"cannot finalize {plan.directory}: {len(missing)} shards are missing: "
                                     f"{missing[:10]}")
        log.info(f"{len(missing)} shards are still being written by other parts; "
                 "the last part to finish writes the manifest")
        return CacheResult(plan.directory, False, written, False)
    if cache.assemble(plan.shards, plan.header, lambda folder: plan.tokenizer.save_pretrained(str(folder))):
        log.info(f"wrote manifest for {len(plan.shards)} shards in {plan.directory}")
    else:
        log.info(f"another part wrote the manifest of {plan.directory} at the same moment")
    return CacheResult(plan.directory, False, written, True)


def _write_part(job: CacheJob, plan, part: int, parts: int, writer: bool) -> int:
    """Write the shards of this part that have no valid done record; return how many this process wrote."""
    cache = plan.cache
    mine = [plan.shards[i] for i in shards_of_part(len(plan.shards), part, parts)]
    todo, damaged = cache.unfinished(mine)
    for problem in damaged:
        log.warning(f"{problem}; not trusted: the shard is written again")
    if writer:
        for shard in todo:
            cache.discard(shard)
    log.info(f"part {part}/{parts}: {len(mine)} shards, {len(mine) - len(todo)} already complete, "
             f"{len(todo)} to write")
    if todo:
        device = resolve_device(job.device, world().local_rank * job.teacher.gpus_per_part)
        times = write_shards(plan, todo, device, part, load_teacher(plan, device), writer)
        log.info(f"part {part}: teacher {times.teacher:.1f} s, blocked on the shard writer "
                 f"{times.writer_wait:.1f} s, final flush {times.final_flush:.1f} s")
    return len(todo) if writer else 0
