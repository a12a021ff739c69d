"""How the student is spread over the job's processes: one process, DDP replicas, or FSDP2 shards.

Every strategy runs the step's whole computation (decoder, chunked head and
loss) inside one module's ``forward``, ``StudentForward``, so DDP's reducer
and FSDP2's unshard/reshard hooks see all of it, including the head weights
that the chunked loss uses outside the Hugging Face model's own forward.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from pipeline.dist import World
from pipeline.errors import ConfigError
from pipeline.train.student import decoder_layers


class StudentForward(nn.Module):
    """Wraps the student; ``forward(fn, *args)`` returns ``fn(student, *args)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(self.model, *args)


def resolve_strategy(name: str, here: World) -> str:
    """``auto`` is ``single`` for one process and ``ddp`` otherwise; ``single`` cannot span processes."""
    if name == "auto":
        return "single" if here.size == 1 else "ddp"
    if name == "single" and here.size > 1:
        raise ConfigError(f"train.strategy single runs one process, but this job has {here.size}; "
                          "use ddp or fsdp (or auto)")
    return name


def _fully_shard(engine: StudentForward, device: torch.device, here: World) -> None:
    """One FSDP2 unit per decoder layer, then the root (embeddings, final norm, head); bf16 compute on GPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (here.size,))
    layer_policy = root_policy = MixedPrecisionPolicy()
    if device.type == "cuda":
        layer_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # The root's inputs include the cached fp32 log-probs, which must not be cast to bf16.
        root_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                           cast_forward_inputs=False)
    for layer in decoder_layers(engine.model):
        fully_shard(layer, mesh=mesh, mp_policy=layer_policy)
    fully_shard(engine, mesh=mesh, mp_policy=root_policy)


def wrap(model: nn.Module, strategy: str, device: torch.device, here: World) -> nn.Module:
    """The module the training step calls: ``StudentForward``, under DDP or sharded by FSDP2 as asked."""
    engine = StudentForward(model)
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(engine, device_ids=[device] if device.type == "cuda" else None)
    if strategy == "fsdp":
        _fully_shard(engine, device, here)
    return engine


@contextmanager
def gradient_sync(engine: nn.Module, strategy: str, sync: bool):
    """Reduce gradients in this backward only when ``sync`` (the step's last micro-batch)."""
    if strategy == "ddp" and not sync:
        with engine.no_sync():
            yield
    elif strategy == "fsdp":
        engine.set_requires_gradient_sync(sync)
        yield
    else:
        yield


def gradient_scale(strategy: str, here: World) -> float:
    """DDP and FSDP average gradients over ranks; each rank's loss is its share of a global mean, so undo that."""
    return float(here.size) if strategy in ("ddp", "fsdp") else 1.0


def full_state_dict(model: nn.Module, strategy: str) -> dict[str, torch.Tensor]:
    """The student's whole state dict on CPU, on rank 0 (a collective under FSDP: every rank calls it)."""
    if strategy != "fsdp":
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
