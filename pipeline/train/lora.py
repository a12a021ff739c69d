"""LoRA students (``student.lora``): peft's low-rank adapters trained on a pretrained student whose weights stay frozen.

Adapting a large pretrained student this way trains a few percent of its
parameters, so AdamW's state shrinks by the same factor. The adapters are
injected into the Hugging Face model in place (``peft.get_peft_model``): the
rest of stage 2 keeps calling the same model (the chunked head over
``model.base_model``'s hidden states, DDP, DCP checkpoints), now with extra
parameters that alone require gradients. peft's ``PeftModel`` around it is
kept only to merge or save the adapters at the end: ``final/`` is either the
merged model, a plain model folder, or peft's adapter folder over
``student.model``, whose last file is ``adapter_config.json``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.config_loading import need, raise_problems
from pipeline.errors import ConfigError

ADAPTER_LAST = "adapter_config.json"
"""The file an adapter-only ``final/`` is uploaded with last, and whose presence marks it whole."""
INSTALL = "pip install 'distillery[lora]'"


@dataclass
class LoraConfig:
    """``student.lora``: train low-rank adapters on the linear layers of a pretrained student, not its weights."""

    r: int = 8
    """Rank of each adapter: a layer's (out x in) weight gets a trained ``B @ A``, B (out x r) and A (r x in)."""
    alpha: float = 16.0
    """Scale of the adapters: their output is multiplied by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the adapters' input while training."""
    target_modules: list | None = None
    """Names of the linear layers that get adapters (each matches the modules whose names end with it), e.g.
    ``[q_proj, k_proj, v_proj, o_proj]``. Default: peft's choice for the model type (``q_proj`` and ``v_proj`` for
    Llama, Mistral and Qwen2; ``c_attn`` for GPT-2)."""
    merge: bool = True
    """``final/`` holds the adapters merged into the weights: a plain model folder. ``false``: peft's adapter folder
    (``adapter_config.json``, ``adapter_model.safetensors``) over ``student.model``, loaded with peft."""

    def __post_init__(self):
        names = self.target_modules
        raise_problems(need(self.r >= 1, "r", f"must be >= 1, got {self.r}"),
                       need(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}"),
                       need(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}"),
                       need(names is None or (bool(names) and all(isinstance(n, str) and n for n in names)),
                            "target_modules", f"must be a non-empty list of module names, or null for peft's default "
                                              f"of the model type; got {names!r}"))


def lora_problems(cfg: LoraConfig | None, random_init: bool, from_teacher: bool) -> list[tuple[str, str] | None]:
    """The checks of ``student.lora`` against the rest of ``student``, for its ``raise_problems``."""
    return [need(not (cfg and random_init), "lora", "adapts a pretrained student: set student.model (or "
                 "student.from_teacher); a random-init student.config has nothing to keep, train it whole"),
            need(not (cfg and not cfg.merge and from_teacher), "lora", "merge: false saves adapters over "
                 "student.model; a from_teacher base is saved nowhere, so keep merge: true")]


def require_peft():
    """The ``peft`` module, or a one-line ``ConfigError`` naming the extra that installs it."""
    try:
        import peft
    except ImportError:
        raise ConfigError(f"student.lora needs the peft package, which is not installed: {INSTALL}") from None
    return peft


def attach_lora(model: nn.Module, cfg: LoraConfig | None, strategy: str, seed: int):
    """Inject ``cfg``'s adapters into ``model`` (a Hugging Face causal LM) in place and freeze every other
    parameter; return peft's ``PeftModel`` around it, the handle that merges or saves them. None without
    ``student.lora``: ``model`` is left as it was. The adapters' random init (A; B starts at zero) draws from
    the global RNG seeded with ``seed``, so that a run's adapters do not depend on what ran before it."""
    if cfg is None:
        return None
    if strategy == "fsdp":
        raise ConfigError("student.lora trains under train.strategy single or ddp, not fsdp: use ddp (or auto "
                          "under torchrun); every rank holds the frozen base, and only the adapters' gradients travel")
    peft = require_peft()
    settings = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                               target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():  # peft asks transformers' deprecated is_gradient_checkpointing: not the user's
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            return peft.get_peft_model(model, settings)
    except ValueError as exc:  # no default for the model type, or no module of the names given
        names = cfg.target_modules or f"null (peft's default for model type {model.config.model_type!r})"
        raise ConfigError(f"student.lora.target_modules {names}: {' '.join(str(exc).split())[:300]}; name linear "
                          "layers of the student, e.g. [q_proj, v_proj]") from None


def refuse_adapter_folder(path: str, key: str) -> None:
    """Refuse a peft adapter folder (the ``final/`` of ``merge: false``) as the model to start from: transformers
    would load its base with the adapters frozen on top, leaving nothing to train."""
    folder = Path(path).expanduser()
    if (folder / ADAPTER_LAST).is_file() and not (folder / "config.json").is_file():
        raise ConfigError(f"{key} {path!r} is a LoRA adapter folder (adapter_config.json, no config.json), not a "
                          "model: start from a merged one (student.lora.merge: true where it was trained, or peft's "
                          "merge_and_unload)")


def saves_adapter(cfg: LoraConfig | None) -> bool:
    """Whether ``final/`` is peft's adapter folder rather than a plain model folder."""
    return cfg is not None and not cfg.merge


def save_student(model: nn.Module, adapter, cfg: LoraConfig | None, weights: dict, folder: Path) -> None:
    """Write the trained student into ``folder``: ``model`` with ``weights`` (its whole state dict, gathered on
    rank 0) as ``save_pretrained`` writes it; for a LoRA student, the adapters merged into the weights, or peft's
    adapter folder alone. Merging folds the adapters into ``model`` in place, so it comes last."""
    if adapter is None:
        model.save_pretrained(str(folder), state_dict=weights, safe_serialization=True)
    elif cfg.merge:
        adapter.merge_and_unload().save_pretrained(str(folder), safe_serialization=True)
    else:  # the vocabulary never changes in training, so peft need not look for the base's config to compare
        adapter.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)
