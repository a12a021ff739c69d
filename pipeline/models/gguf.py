"""GGUF teachers: llama.cpp's one-file checkpoints, loaded dequantised through transformers' GGUF support.

A GGUF holds the config, the tokenizer (as ``tokenizer.ggml.*`` metadata, with the chat template) and the
weights. ``pipeline.models.hf`` loads a teacher from one when ``teacher.gguf_file`` is set; ``convert_gguf`` writes one as
an ordinary ``save_pretrained`` folder. Both need the ``gguf`` package (the ``gguf`` extra).

transformers does not keep a GGUF's name (``general.name``) in the folder it saves: ``convert_gguf`` writes it,
with the file's name, into ``gguf_source.json`` beside the weights, so that a report can say which model a
converted folder holds.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from pipeline.errors import TeacherError
from pipeline.log import get_logger
from storage import atomic_write, ensure_writable

GGUF_MIN_VERSION = "0.13"
"""transformers asks for 0.10, but gguf 0.10 and 0.11 fail under numpy 2; 0.13 is the oldest tested."""
INSTALL = "pip install 'gguf>=0.13' (or install Distillery with its gguf extra: pip install -e '.[gguf]')"
KEY = "teacher.gguf_file"
SOURCE_NAME = "gguf_source.json"
"""What ``convert_gguf`` keeps of its source: ``{"gguf_file": name, "general.name": ..., ...}`` (``gguf_metadata``)."""
log = get_logger("gguf")


def split_gguf_path(value: str) -> tuple[str | None, str]:
    """``(folder, file name)`` of a ``gguf_file`` setting: a bare name has no folder (it lies in the model's), a
    path (``dir/name.gguf``, a URL) names its own."""
    folder, sep, name = value.rstrip("/").rpartition("/")
    return (folder or "/", name) if sep else (None, value)


def gguf_setting(model: str, gguf_file: str | None, section: str) -> tuple[str, str | None, tuple[str, str] | None]:
    """``(model, gguf_file, problem)`` of a ``<section>.model`` and ``<section>.gguf_file`` pair: a ``gguf_file``
    path becomes its folder (the model) and its name; the problem names a ``model`` that is another folder."""
    folder, name = split_gguf_path(gguf_file) if gguf_file else (None, None)
    if folder is None:
        return model, gguf_file, None
    if model and not same_folder(model, folder):
        return model, gguf_file, ("gguf_file", f"{gguf_file!r} is not in {section}.model {model!r}; give its name "
                                               "alone (a file in that folder), or its path without the model")
    return model or folder, name, None


def same_folder(a: str, b: str) -> bool:
    """Whether two model settings name one folder (URLs compare as text, local paths resolved)."""
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _gguf_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return None


def require_gguf(key: str = KEY) -> None:
    """Raise a one-line ``TeacherError`` unless a ``gguf`` package that transformers accepts is installed."""
    from packaging.version import Version

    found = _gguf_version()
    if found is None or Version(found) < Version(GGUF_MIN_VERSION):
        have = "is not installed" if found is None else f"is {found}, older than {GGUF_MIN_VERSION}"
        raise TeacherError(f"{key} needs the gguf package, which {have}: {INSTALL}")


def check_gguf_file(source: str, gguf_file: str, key: str = KEY) -> None:
    """Raise a one-line ``TeacherError`` when the model folder ``source`` has no file ``gguf_file`` (a hub id
    is not checked: transformers downloads the file)."""
    folder = Path(source).expanduser()
    if folder.is_dir() and not (folder / gguf_file).is_file():
        found = sorted(p.name for p in folder.glob("*.gguf"))
        there = f"it holds {', '.join(found)}" if found else "it holds no .gguf file"
        raise TeacherError(f"{key} {gguf_file!r}: no such file in {source} ({there}); name a .gguf file there, "
                           "or give the file's path")


def gguf_arguments(source: str, gguf_file: str, key: str = KEY) -> dict:
    """The ``from_pretrained`` arguments that load ``gguf_file`` from the model folder (or hub id) ``source``,
    once ``gguf`` is known to be installed and a local file to exist."""
    require_gguf(key)
    check_gguf_file(source, gguf_file, key)
    return {"gguf_file": gguf_file}


def gguf_error(gguf_file: str, failure: str, key: str = KEY) -> TeacherError:
    """The one-line error for a GGUF that transformers could not load (``failure``: its message on one line)."""
    unsupported = re.search(r"architecture (\S+) is not supported", failure)
    if unsupported:
        try:
            from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES as supported
        except ImportError:
            supported = []
        names = sorted(set(supported) - {"general", "tokenizer"})  # metadata sections, not architectures
        listed = f" (it loads {', '.join(names)})" if names else ""
        return TeacherError(f"{key} {gguf_file!r}: this transformers cannot load GGUF architecture "
                            f"{unsupported.group(1)!r}{listed}; give the model's Hugging Face checkpoint as "
                            "teacher.model instead (without gguf_file), or upgrade transformers")
    return TeacherError(f"{key} {gguf_file!r} could not be loaded: {failure}")


def gguf_metadata(path: str | Path) -> dict[str, str]:
    """The text fields of a GGUF's ``general.*`` metadata (``general.name``, ``general.organization``,
    ``general.size_label``, ...), read from its header: no tensor is loaded."""
    from gguf import GGUFReader, GGUFValueType

    fields = GGUFReader(str(path)).fields
    # A string field's value is its last part (gguf's ReaderField layout, stable since before 0.13).
    return {key: bytes(field.parts[field.data[0]]).decode("utf-8", "replace") for key, field in fields.items()
            if key.startswith("general.") and field.types == [GGUFValueType.STRING]}


def locate(model: str, gguf_file: str | None) -> tuple[Path, str]:
    """``(folder, file name)`` of ``convert-gguf``'s ``--model`` (a .gguf file, or a folder) and ``--gguf-file``
    (a name in that folder; optional when the folder holds exactly one .gguf)."""
    path = Path(model).expanduser()
    if path.is_file():
        if gguf_file and gguf_file != path.name:
            raise TeacherError(f"--gguf-file {gguf_file!r}: --model {model} is a file already; give one or the other")
        return path.parent, path.name
    if not path.is_dir():
        raise TeacherError(f"--model {model}: no such file or directory; give a .gguf file or the folder holding it")
    if gguf_file:
        check_gguf_file(str(path), gguf_file, "--gguf-file")
        return path, gguf_file
    found = sorted(p.name for p in path.glob("*.gguf"))
    if not found:
        raise TeacherError(f"--model {model} holds no .gguf file; give a .gguf file or the folder holding one")
    if len(found) > 1:
        raise TeacherError(f"--model {model} holds {len(found)} .gguf files ({', '.join(found)}); name one with "
                           "--gguf-file")
    return path, found[0]


def _check_out(out: Path, source: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that holds the GGUF, or that exists and is not an empty folder (unless ``overwrite``)."""
    target, folder = out.expanduser().resolve(), source.resolve()
    if folder == target or folder.is_relative_to(target):
        raise TeacherError(f"--out {out} holds the GGUF being converted; choose another directory")
    if not (out.exists() or out.is_symlink()) or out.is_dir() and not any(out.iterdir()):
        return
    if not overwrite:
        what = "a directory that is not empty" if out.is_dir() else "a file"
        raise TeacherError(f"--out {out} is {what}; choose a new or empty directory, or pass --overwrite to replace it")


def convert_gguf(model: str, gguf_file: str | None, out: str | Path, overwrite: bool = False) -> Path:
    """Write the GGUF model ``model``/``gguf_file`` (see ``locate``) as a ``save_pretrained`` folder at ``out``:
    fp32 safetensors weights, dequantised, the tokenizer with its chat template, and ``SOURCE_NAME`` (the file's
    name and ``general.*`` metadata). Returns ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_gguf("convert-gguf")
    folder, name = locate(model, gguf_file)
    out = Path(out)
    _check_out(out, folder, overwrite)
    ensure_writable(out.expanduser().resolve().parent, "--out")  # before minutes of loading
    began = time.perf_counter()
    try:
        source = {"gguf_file": name, **gguf_metadata(folder / name)}
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise gguf_error(name, " ".join(str(exc).split()), "--gguf-file") from exc
    # transformers refuses to save a model that carries a quantization config, and a GGUF-loaded one does:
    # build a plain model of the same config and give it the dequantised weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    del loaded
    with atomic_write(out) as tmp:
        plain.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / SOURCE_NAME).write_text(json.dumps(source, indent=2) + "\n")
    params = sum(p.numel() for p in plain.parameters())
    log.info(f"converted {folder / name} ({config.model_type}, {params:,} parameters) in "
             f"{time.perf_counter() - began:.0f} s")
    return out
