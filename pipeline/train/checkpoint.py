"""Training checkpoints: one directory per step, written by every rank with ``torch.distributed.checkpoint``.

The model and optimizer tensors go through DCP's Hugging Face storage, as
safetensors files whose headers record each rank's slice. Loading reshards
them onto any world size and any strategy (``single``, ``ddp`` or ``fsdp``),
and reading them never unpickles anything. Rank 0 adds ``scheduler.pt`` and
``rng.pt`` (plain tensors and numbers, loaded with ``weights_only=True``) and,
last, ``state.json``: step, tokens, samples consumed, strategy, world size,
global batch, the size and sha256 of every other file, and ``state_sha256``,
its seal. The directory appears under its final name only when complete, and
``open_checkpoint`` checks all of it before anything is loaded.

When ``train.out_dir`` is a URL, checkpoints are written into its local working copy as above, then uploaded
by rank 0 with ``state.json`` last (``publish_checkpoint``): a checkpoint at the destination is complete exactly
when its ``state.json`` is there. Rank 0 hashes every rank's files, so the ranks of a multi-node job must share
the working copy (``cache.local_dir`` on a shared filesystem), as they must share a local ``out_dir``.
"""
from __future__ import annotations

import json
import re
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.dist import World, barrier, broadcast_text
from pipeline.errors import CheckpointError
from storage import Mirror, atomic_write, read_sealed, remove_path, tree_sha256, with_seal

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_NAME, STATE_SEAL = "state.json", "state_sha256"
SCHEDULER_NAME, RNG_NAME = "scheduler.pt", "rng.pt"


@dataclass
class Checkpoint:
    """A checkpoint whose files passed their checks: its state and the plain data of its two ``.pt`` files."""

    path: Path
    state: dict
    schedule: dict
    rng: dict


def checkpoint_dirs(root: Path) -> list[Path]:
    """Checkpoints under ``root``, oldest first (temporaries and set-aside ones never match the name)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir())


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
            torch.save(scheduler.state_dict(), tmp / SCHEDULER_NAME)
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, tmp / RNG_NAME)
            files = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": tree_sha256(p)}
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / STATE_NAME).write_text(json.dumps(with_seal({**state, "files": files}, STATE_SEAL), indent=2))
    barrier(here)  # no rank runs ahead before the checkpoint has its final name
    if here.is_main:
        for old in checkpoint_dirs(root)[:-keep]:
            remove_path(old)
    return path


def publish_checkpoint(out: Mirror, path: Path) -> None:
    """Upload the complete local checkpoint ``path`` of ``out``'s working copy, ``state.json`` last, then delete
    the destination's checkpoints that local pruning removed (or set aside as damaged); rank 0 only."""
    out.push(f"{CHECKPOINTS}/{path.name}", last=(STATE_NAME,))
    kept = {p.name for p in checkpoint_dirs(out.local / CHECKPOINTS)}
    for name in out.names(CHECKPOINTS):
        if STEP_DIR.match(name) and name not in kept:  # its seal first: a half-deleted one never looks complete
            out.remove(f"{CHECKPOINTS}/{name}/{STATE_NAME}")
            out.remove(f"{CHECKPOINTS}/{name}")


def _reason(exc: BaseException) -> str:
    """The part of a load error that says what is wrong: the first rank's own error for DCP's collective
    ``CheckpointException``, and the line after its advice for torch's weights-only refusal."""
    if hasattr(exc, "failures"):
        exc = next(iter(exc.failures.values()))[0]
    text = str(exc).split("WeightsUnpickler error:")[-1].strip()
    return text.splitlines()[0].split(". ")[0] if text else type(exc).__name__


def read_state(path: Path) -> dict:
    """``state.json`` of the checkpoint ``path``, or ``CheckpointError`` when it is missing, torn or edited."""
    return read_sealed(path / STATE_NAME, STATE_SEAL, CheckpointError)


def _check_files(path: Path, state: dict) -> None:
    """Every file's size and sha256 against ``state.json`` (a checkpoint from before they were recorded passes)."""
    for name, expected in state.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}, recorded in {path / STATE_NAME}, is missing")
        if file.stat().st_size != expected["bytes"]:
            raise CheckpointError(f"{file} is {file.stat().st_size} bytes, but {path / STATE_NAME} records "
                                  f"{expected['bytes']}: it is truncated or damaged")
        if tree_sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file} does not match its sha256 in {path / STATE_NAME}: it is damaged")


def _load_plain(file: Path, key: str) -> dict:
    """A ``torch.save``d dict of plain tensors and numbers holding ``key``; refused, never run, if it asks for
    anything else (``weights_only``: a pickle naming another class or function is not unpickled)."""
    try:
        data = torch.load(file, weights_only=True)
    except Exception as exc:  # the weights-only unpickler and the zip reader fail in many ways; all mean damage
        raise CheckpointError(f"{file} is not plain tensors and numbers ({_reason(exc)}); it was not loaded") from None
    if not isinstance(data, dict) or key not in data:
        raise CheckpointError(f"{file} does not hold a {key!r} entry; it is damaged")
    return data


def open_checkpoint(path: Path, hash_files: bool) -> Checkpoint:
    """Check ``path`` (with ``hash_files``, every file against ``state.json``) and read its small files."""
    state = read_state(path)
    if hash_files:
        _check_files(path, state)
    return Checkpoint(path, state, _load_plain(path / SCHEDULER_NAME, "last_epoch"), _load_plain(path / RNG_NAME, "torch"))


def load_checkpoint(checkpoint: Checkpoint, model, optimizer, scheduler) -> None:
    """Restore the model, optimizer and schedule (a collective: every rank calls it).

    The RNG state is left to ``restore_rng``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    tensors, aliases, model_state, optim_state = _tensor_state(model, optimizer)
    try:
        with _single_process_is_meant():
            dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(checkpoint.path)))
    # DCP wraps the errors of every rank (a missing key, a torn file) in one exception, a BaseException.
    except (Exception, CheckpointException) as exc:
        files = ", ".join(str(p) for p in sorted(checkpoint.path.glob("*.safetensors")))
        raise CheckpointError(f"{files or checkpoint.path} could not be loaded into this student "
                              f"({_reason(exc)})") from None
    set_state_dict(model, optimizer,
                   model_state_dict={k: tensors[aliases.get(f"model.{k}", f"model.{k}")] for k in model_state},
                   optim_state_dict={k: tensors.get(f"optim.{k}", v) for k, v in optim_state.items()},
                   options=StateDictOptions(flatten_optimizer_state_dict=True))
    try:
        scheduler.load_state_dict(checkpoint.schedule)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint.path / SCHEDULER_NAME} does not fit this schedule ({exc!r})") from None
    # The tensors above carry no hyperparameters, and loading a scheduler does not touch the optimizer.
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr


def restore_rng(checkpoint: Checkpoint) -> None:
    """Set the RNGs as they were at the checkpoint. Call it last: anything that draws from the global RNG
    after it (a DataLoader's base seed, for one) would shift the dropout masks of the steps that follow."""
    torch.set_rng_state(checkpoint.rng["torch"])
    if "cuda" in checkpoint.rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(checkpoint.rng["cuda"])


def load_model_weights(path: Path, model) -> None:
    """Load only the model weights of the checkpoint ``path`` into ``model``, a plain (unwrapped) Hugging Face
    model of the trained architecture, in place: for scoring a run at its intermediate steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    tensors, seen = {}, set()
    for key, value in model.state_dict().items():
        if _storage(value) not in seen:  # a tied weight is saved under its first name only
            seen.add(_storage(value))
            tensors[f"model.{key}"] = value
    with _single_process_is_meant():
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path)))
