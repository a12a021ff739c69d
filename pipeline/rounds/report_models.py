"""Which models a run report is about, named: a path alone (``runs/real/teacher-hf``) does not say what it holds.

A teacher is named by its hub id, by the ``general.name`` of the GGUF it is loaded from (read from the file's
header), or, for a folder that ``distillery convert-gguf`` wrote, by the ``general.name`` it recorded there
(``gguf_source.json``); a student by its round. Each is listed with its path.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.models.gguf import SOURCE_NAME, gguf_metadata
from pipeline.models.hf import local_model, looks_local
from pipeline.rounds.config import RunJob, previous_final, round_teacher
from pipeline.rounds.continuations import Speaker


@dataclass(frozen=True)
class ModelEntry:
    """One row of the report's model table."""

    role: str
    """``teacher``, ``teacher 2`` (a later round's own), or ``round N student``."""
    name: str | None
    """What the model is, beyond its path; None where nothing says (a folder of the user's own)."""
    path: str
    """The model as configured: a folder, a URL, or a hub id, with its GGUF file."""
    params: int | None
    speaker: Speaker
    """How the report loads it to write continuations."""


def _gguf_name(metadata: dict, source: str | None) -> str | None:
    """``general.name (organization), SOURCE``, from whatever of it the metadata holds."""
    name = metadata.get("general.name")
    organization = metadata.get("general.organization")
    parts = [f"{name} ({organization})" if name and organization else name, source]
    return ", ".join(p for p in parts if p) or None


def model_name(model: str, gguf_file: str | None, local: str) -> str | None:
    """The name of ``model`` (its file ``gguf_file``), read through its loadable copy ``local``: see the module."""
    if not looks_local(model) and "://" not in model:  # a hub id names itself
        return f"{model}, {gguf_file}" if gguf_file else model
    folder = Path(local).expanduser()
    if gguf_file:
        return _gguf_name(gguf_metadata(folder / gguf_file), f"from {gguf_file}")
    try:
        recorded = json.loads((folder / SOURCE_NAME).read_text())
    except (OSError, ValueError):  # no record: a folder of the user's own
        return None
    if not isinstance(recorded, dict):
        return None
    return _gguf_name(recorded, recorded.get("gguf_file") and f"converted from {recorded['gguf_file']}")


def stored_parameters(local: str, gguf_file: str | None) -> int | None:
    """The parameter count of a model folder's weights, from the headers of its safetensors files or its GGUF
    (no tensor is read); None for a hub id or other weight files."""
    folder = Path(local).expanduser()
    if not folder.is_dir():
        return None
    if gguf_file:
        from gguf import GGUFReader

        return sum(int(tensor.n_elements) for tensor in GGUFReader(str(folder / gguf_file)).tensors)
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as stored:
            total += sum(math.prod(stored.get_slice(name).get_shape()) for name in stored.keys())
    return total or None


def student_name(local: str) -> str | None:
    """``llama, 2 layers, hidden 128``: the architecture of the student saved in the folder ``local``."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(local)
    layers, hidden = getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None)
    shape = f", {layers} layer{'s' * (layers != 1)}, hidden {hidden}" if layers and hidden else ""
    return f"{config.model_type}{shape}"


def _teachers(job: RunJob, rounds: list[int], local_dir: str | None) -> list[ModelEntry]:
    """The run's teachers that are not its own students, in the order rounds first use them."""
    entries: dict[tuple[str, str | None], ModelEntry] = {}
    for index in rounds:
        teacher = round_teacher(job, index)
        model, gguf_file = teacher["model"], teacher["gguf_file"]
        if (index > 1 and model == previous_final(job, index)) or (model, gguf_file) in entries:
            continue
        role = "teacher" if not entries else f"teacher {len(entries) + 1}"
        local = local_model(model, local_dir)
        shown = f"{model} ({gguf_file})" if gguf_file else model
        entries[(model, gguf_file)] = ModelEntry(role, model_name(model, gguf_file, local), shown,
                                                 stored_parameters(local, gguf_file), Speaker(role, local, gguf_file))
    return list(entries.values())


def run_models(job: RunJob, rows: list[dict], finals: dict[int, str], local_dir: str | None) -> list[ModelEntry]:
    """The teachers, then each complete round's student (``rows``: the report's rows; ``finals``: each round's
    ``final/`` as recorded, and ``local_dir`` where copies of those at URLs go)."""
    rounds = [row["round"] for row in rows]
    students = []
    for row in rows:
        role = f"round {row['round']} student"
        final = finals[row["round"]]
        local = local_model(final, local_dir, role)
        students.append(ModelEntry(role, student_name(local), final, row["student params"], Speaker(role, local)))
    return _teachers(job, rounds, local_dir) + students
