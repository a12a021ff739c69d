"""Hugging Face models for both stages: loading configs, tokenizers and weights, and their identities (hashes).

A model may also be one GGUF file in such a folder (``gguf_file``, see ``pipeline.models.gguf``).

A model may also be a folder at a URL (``s3://.../round-1/train/final``, a previous round's student): transformers
loads only local folders and hub ids, so it is loaded from a local copy under ``local_dir``, downloaded once per
process, from which its config, tokenizer, weights and weights hash are all read.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from pipeline.errors import TeacherError
from pipeline.log import get_logger
from pipeline.models.device import DTYPES, compute_dtype
from pipeline.models.gguf import gguf_arguments, gguf_error
from storage import CacheNotFoundError, local_folder, names_sha256, tree_sha256

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
log = get_logger("hf")


def load_failure(exc: Exception) -> str:
    """A transformers loading error on one line (some, such as the refusal of shipped code, span several)."""
    return " ".join(str(exc).split())


def looks_local(name: str) -> bool:
    """A path rather than a hub id (``owner/name``): it exists, starts like a path, or has more than one ``/``."""
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists() or name.count("/") > 1


_COPIES: dict[tuple[str, str], str] = {}
"""Local copies of the models at URLs made by this process, by (URL, local_dir): one download serves every read."""


def local_model(name: str, local_dir: str | os.PathLike | None = None, key: str = "teacher.model") -> str:
    """What transformers can load for ``name``: ``name`` itself (a path or a hub id), or the path of a local
    copy of the folder at a URL, downloaded under ``local_dir`` unless this process has one already."""
    copy = _COPIES.get((name, str(local_dir)))
    if copy is not None and Path(copy).is_dir():
        return copy
    try:
        folder = local_folder(name, local_dir)
    except CacheNotFoundError:
        raise TeacherError(f"{key} {name!r}: no such model directory") from None
    if folder == Path(name):
        return name  # a path or hub id, as given (Path would normalise it)
    _COPIES[(name, str(local_dir))] = str(folder)
    return str(folder)


def _check_local(name: str, key: str, local_dir: str | os.PathLike | None = None) -> str:
    """The loadable form of ``name`` (see ``local_model``); a path that is not a folder gets this one line, not
    the hub's message about repo ids."""
    source = local_model(name, local_dir, key)
    if looks_local(source) and not Path(source).expanduser().is_dir():
        raise TeacherError(f"{key} {name!r}: no such model directory")
    return source


def _gguf(source: str, gguf_file: str | None) -> dict:
    """``from_pretrained`` arguments that pick ``gguf_file`` in ``source`` (none without one)."""
    return gguf_arguments(source, gguf_file) if gguf_file else {}


def load_config_and_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False,
                              key: str = "teacher.model", local_dir: str | os.PathLike | None = None,
                              gguf_file: str | None = None):
    """Load a model's HF config and tokenizer without its weights (from its file ``gguf_file`` when given);
    ``key`` names the setting in errors."""
    from transformers import AutoConfig, AutoTokenizer

    source = _check_local(name, key, local_dir)
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code, **_gguf(source, gguf_file)}
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        if gguf_file:
            raise gguf_error(gguf_file, load_failure(exc)) from exc
        raise TeacherError(f"{key} {name!r} could not be loaded: {load_failure(exc)}") from exc
    return config, tokenizer


def max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def load_model(name: str, device: torch.device, dtype: str = "auto", revision: str | None = None,
               trust_remote_code: bool = False, key: str = "teacher.model", placement: dict | None = None,
               local_dir: str | os.PathLike | None = None, gguf_file: str | None = None):
    """Load a causal LM's weights (dequantised from its file ``gguf_file`` when given) in ``dtype`` (``auto``:
    chosen for ``device`` by ``compute_dtype``) onto ``device``, in eval mode.

    ``placement`` holds extra ``from_pretrained`` arguments that place the
    weights themselves (``device_map`` and ``max_memory``, or a tensor-parallel
    ``distributed_config``); the model is then not moved to ``device``.
    """
    from transformers import AutoModelForCausalLM

    source = _check_local(name, key, local_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=revision, trust_remote_code=trust_remote_code, dtype=DTYPES[compute_dtype(dtype, device)],
            **_gguf(source, gguf_file), **(placement or {}))
    except (OSError, ValueError) as exc:
        if gguf_file:
            raise gguf_error(gguf_file, load_failure(exc)) from exc
        raise TeacherError(f"{key} {name!r}: weights could not be loaded: {load_failure(exc)}") from exc
    return (model if placement else model.to(device)).eval()


def input_device(model) -> torch.device:
    """Where a model's input ids must go: the device of its input embeddings (the first of a ``device_map``)."""
    return model.get_input_embeddings().weight.device


def weights_sha256(model_dir: Path) -> str | None:
    """sha256 over ``config.json`` and the weight files of a local model folder, in sorted order, each as its
    name, NUL and its bytes."""
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in model_dir.glob(pattern)})
    if not files:
        return None
    names = [p.name for p in [model_dir / "config.json", *files] if p.is_file()]
    return names_sha256(model_dir, names)


def teacher_identity(name: str, revision: str | None, config, local_dir: str | os.PathLike | None = None,
                     gguf_file: str | None = None) -> dict:
    """Teacher name, resolved revision and, for folders (local, or the local copy of one at a URL), the
    weight-file hash: with ``gguf_file``, that file's sha256 (as ``sha256sum`` prints it), which it names."""
    local = Path(local_model(name, local_dir)).expanduser()
    if gguf_file:
        digest = tree_sha256(local / gguf_file) if local.is_dir() else None
        revision = None if local.is_dir() else getattr(config, "_commit_hash", None) or revision
        return {"name": name, "gguf_file": gguf_file, "revision": revision, "weights_sha256": digest}
    if local.is_dir():
        return {"name": name, "revision": None, "weights_sha256": weights_sha256(local)}
    return {"name": name, "revision": getattr(config, "_commit_hash", None) or revision, "weights_sha256": None}


def tokenizer_sha256(tokenizer) -> str:
    """Hash of the token-to-id mapping and special tokens: what decides the ids a model sees."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = {"eos": tokenizer.eos_token, "bos": tokenizer.bos_token, "pad": tokenizer.pad_token}
    text = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()
