"""Training checkpoints: written atomically as one directory, loaded without unpickling code.

A checkpoint holds ``model.safetensors``, ``optimizer.pt`` and ``scheduler.pt``
(loaded with ``weights_only=True``), ``rng.pt`` and ``state.json`` (step,
tokens and the reader's stream state).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from storage.atomic import atomic_write, remove_path

STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporaries never match the name)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").is_file())


def save_checkpoint(root: Path, model, optimizer, scheduler, state: dict, keep: int) -> Path:
    path = root / f"step-{state['step']:08d}"
    with atomic_write(path) as tmp:
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    for old in checkpoint_dirs(root)[:-keep]:
        remove_path(old)
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler, device: torch.device) -> dict:
    """Restore everything saved by ``save_checkpoint``; return its ``state.json``."""
    missing, unexpected = load_model(model, str(path / "model.safetensors"), device=str(device))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit the student: missing {missing}, unexpected {unexpected}")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "state.json").read_text())
