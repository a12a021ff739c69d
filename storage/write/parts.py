"""Pure functions that split a cache's shards between parallel writers.

A *part* is one writer process. With ``num_tasks`` Slurm array tasks each
running ``world_size`` torchrun ranks there are ``num_tasks * world_size``
parts; shard ``i`` belongs to part ``i % num_parts``.
"""
from __future__ import annotations


def num_parts(num_tasks: int, world_size: int) -> int:
    if num_tasks < 1 or world_size < 1:
        raise ValueError(f"num_tasks and world_size must be >= 1, got {num_tasks} and {world_size}")
    return num_tasks * world_size


def part_index(task_index: int, num_tasks: int, rank: int, world_size: int) -> int:
    """The part owned by torchrun ``rank`` inside array task ``task_index``."""
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"task index {task_index} is outside [0, {num_tasks})")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    return task_index * world_size + rank


def shards_of_part(num_shards: int, part: int, parts: int) -> list[int]:
    """Shard indices written by ``part``: disjoint across parts, covering all."""
    if not 0 <= part < parts:
        raise ValueError(f"part {part} is outside [0, {parts})")
    return list(range(part, num_shards, parts))
