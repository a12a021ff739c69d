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


def init_process_group(here: World, single_process_group: bool = False) -> None:
    """Join the job's process group (NCCL with CUDA, else gloo) when there is more than one process.

    ``single_process_group`` makes a group of one for a lone process (DDP and
    FSDP need one even then); it needs no launcher, so a plain ``python`` run works.
    """
    if dist.is_initialized() or (here.size == 1 and not single_process_group):
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if here.size == 1 and "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend)


def _wire_device(tensor: torch.Tensor) -> torch.device:
    """Where a collective's tensor must live: NCCL moves only GPU tensors, gloo any."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce_sum(tensor: torch.Tensor, here: World) -> torch.Tensor:
    """Sum ``tensor`` over every process, in place; a no-op for one process."""
    if here.size > 1:
        wire = tensor.to(_wire_device(tensor))
        dist.all_reduce(wire)
        tensor.copy_(wire)
    return tensor


def any_rank(flag: bool, here: World) -> bool:
    """True when ``flag`` is true on any process, so that every process takes the same branch."""
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0]), here).item())


def barrier(here: World) -> None:
    if here.size > 1:
        dist.barrier()


def broadcast_text(text: str, here: World) -> str:
    """Rank 0's ``text`` on every process."""
    if here.size == 1:
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_rows(tensor: torch.Tensor, here: World) -> torch.Tensor:
    """(W, *shape): every process's equally shaped ``tensor``, in rank order."""
    if here.size == 1:
        return tensor.unsqueeze(0)
    wire = tensor.to(_wire_device(tensor))
    parts = [torch.empty_like(wire) for _ in range(here.size)]
    dist.all_gather(parts, wire)
    return torch.stack(parts).to(tensor.device)
