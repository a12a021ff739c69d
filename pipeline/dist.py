"""The one place that reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK and sets up the process group."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """The torchrun environment of this process; a single process when it is not set."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def init_process_group(here: World) -> None:
    """Join the job's process group (NCCL with CUDA, else gloo) when there is more than one process."""
    if here.size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def all_reduce_sum(tensor: torch.Tensor, here: World) -> torch.Tensor:
    """Sum ``tensor`` over every process, in place; a no-op for one process."""
    if here.size > 1:
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag: bool, here: World) -> bool:
    """True when ``flag`` is true on any process, so that every process takes the same branch."""
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0]), here).item())


def barrier(here: World) -> None:
    if here.size > 1:
        dist.barrier()
