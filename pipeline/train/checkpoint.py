"""Training checkpoints: one directory per step, written by every rank with ``torch.distributed.checkpoint``.

The model and optimizer tensors go through DCP's Hugging Face storage, as
safetensors files whose headers record each rank's slice. Loading reshards
them onto any world size and any strategy (``single``, ``ddp`` or ``fsdp``),
and reading them never unpickles anything. Rank 0 adds ``scheduler.pt`` and
``rng.pt`` (plain tensors and numbers, loaded with ``weights_only=True``) and
``state.json``: step, tokens, samples consumed, strategy, world size and
global batch. The directory appears under its final name only when complete.
"""
from __future__ import annotations

import json
import re
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from pipeline.dist import World, barrier, broadcast_text
from pipeline.errors import ConfigError
from storage.atomic import atomic_write, remove_path

STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporaries never match the name)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").is_file())


def _storage(tensor: torch.Tensor) -> tuple:
    """What identifies a tensor's memory (of this rank's shard, for a DTensor)."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape), local.dtype


def _tensor_state(model, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str], dict, dict]:
    """Model and optimizer tensors under one flat namespace, the names left out as aliases, and the two dicts
    they came from.

    Tied weights (an embedding shared with the head) appear under two names; safetensors refuses shared
    memory, so only the first name is saved and ``aliases`` maps the others to it. Under FSDP the tensors
    are this rank's DTensor shards; otherwise full tensors.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer,
                                              options=StateDictOptions(flatten_optimizer_state_dict=True))
    tensors, aliases, first_name = {}, {}, {}
    for key, value in model_state.items():
        name = f"model.{key}"
        owner = first_name.setdefault(_storage(value), name)
        if owner == name:
            tensors[name] = value
        else:
            aliases[name] = owner
    tensors.update({f"optim.{k}": v for k, v in optim_state.items() if isinstance(v, torch.Tensor)})
    return tensors, aliases, model_state, optim_state


@contextmanager
def _single_process_is_meant():
    """DCP warns that it assumes one process whenever no process group exists: for ``single``, that is right."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_checkpoint(root: Path, model, optimizer, scheduler, state: dict, keep: int, here: World) -> Path:
    """Write ``<root>/step-NNNNNNNN`` (a collective: every rank calls it) and keep the newest ``keep``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    path = root / f"step-{state['step']:08d}"
    with atomic_write(path) if here.is_main else nullcontext() as tmp:
        tmp = Path(broadcast_text(str(tmp), here))
        if here.is_main:
            tmp.mkdir()
        barrier(here)
        tensors, _, _, _ = _tensor_state(model, optimizer)
        with _single_process_is_meant():
            dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True))
        if here.is_main:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps(state, indent=2))
    barrier(here)  # no rank runs ahead before the checkpoint has its final name
    if here.is_main:
        for old in checkpoint_dirs(root)[:-keep]:
            remove_path(old)
    return path


def read_state(path: Path) -> dict:
    return json.loads((path / "state.json").read_text())


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore the model, optimizer and schedule (a collective: every rank calls it); return ``state.json``.

    The RNG state is left to ``restore_rng``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    tensors, aliases, model_state, optim_state = _tensor_state(model, optimizer)
    try:
        with _single_process_is_meant():
            dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path)))
    except Exception as exc:  # DCP wraps the missing-key and shape errors of every rank in one exception
        raise ConfigError(f"checkpoint {path} does not fit this student: {str(exc).splitlines()[0]}; "
                          "train it into a new train.out_dir") from exc
    set_state_dict(model, optimizer,
                   model_state_dict={k: tensors[aliases.get(f"model.{k}", f"model.{k}")] for k in model_state},
                   optim_state_dict={k: tensors.get(f"optim.{k}", v) for k, v in optim_state.items()},
                   options=StateDictOptions(flatten_optimizer_state_dict=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    # The tensors above carry no hyperparameters, and loading a scheduler does not touch the optimizer.
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    return read_state(path)


def restore_rng(path: Path) -> None:
    """Set the RNGs as they were at the checkpoint. Call it last: anything that draws from the global RNG
    after it (a DataLoader's base seed, for one) would shift the dropout masks of the steps that follow."""
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
