"""Build the student: pretrained, random-init from HF config fields, or layers copied from a teacher."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import ConfigError, TeacherError
from pipeline.models.hf import load_failure, local_model, max_positions, tokenizer_sha256
from pipeline.train.config import StudentConfig
from pipeline.train.lora import refuse_adapter_folder

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer")


def decoder_layers(model) -> nn.ModuleList:
    """The ModuleList of transformer blocks (``model.layers`` in Llama, ``transformer.h`` in GPT-2)."""
    base = model.base_model
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise TeacherError(f"cannot find the decoder layers of {type(model).__name__} (looked for layers, h and blocks)")


def _select_layers(model, keep: list[int]):
    layers = decoder_layers(model)
    bad = [i for i in keep if not 0 <= i < len(layers)]
    if bad or not keep:
        raise ConfigError(f"student.layers {keep} must be non-empty indices in [0, {len(layers)})")
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(kept):
        attention = getattr(layer, "self_attn", None) or getattr(layer, "attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index  # KV-cache slots follow the new numbering
    base = model.base_model
    setattr(base, "layers" if hasattr(base, "layers") else "h", kept)
    for key in LAYER_COUNT_KEYS:
        if hasattr(model.config, key):
            setattr(model.config, key, len(keep))
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model


def build_student(cfg: StudentConfig, cache_vocab: int, tokenizer, local_dir: str | None = None) -> nn.Module:
    """The student model in fp32, checked against the cache's vocabulary and tokenizer. A model at a URL (the
    previous round's uploaded ``final/``) is loaded from a local copy under ``local_dir``."""
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if cfg.model or cfg.from_teacher:
        name = cfg.model or cfg.from_teacher
        key = "student.model" if cfg.model else "student.from_teacher"
        path = local_model(name, local_dir, key=key)
        refuse_adapter_folder(path, key)
        try:
            own = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise TeacherError(f"student model {name!r} could not be loaded: {load_failure(exc)}") from exc
        if tokenizer_sha256(own) != tokenizer_sha256(tokenizer):
            raise ConfigError(
                f"the tokenizer of student {path!r} (sha256 {tokenizer_sha256(own)[:12]}) differs from the cache's "
                f"(sha256 {tokenizer_sha256(tokenizer)[:12]}), which it would train with; set student.tokenizer to "
                f"{path!r} to train it with its own tokenizer"
            )
        if cfg.from_teacher:
            layers = decoder_layers(model)
            model = _select_layers(model, cfg.layers if cfg.layers is not None else list(range(0, len(layers), 2)))
    else:
        fields = dict(cfg.config)
        model_type = fields.pop("model_type")
        fields.setdefault("vocab_size", cache_vocab)
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            fields.setdefault(key, getattr(tokenizer, key))
        if model_type not in CONFIG_MAPPING:
            raise ConfigError(f"student.config: model_type {model_type!r} is not a transformers model type "
                              "(e.g. llama, gpt2, qwen2)")
        torch.manual_seed(cfg.seed)
        try:
            config = AutoConfig.for_model(model_type, **fields)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except Exception as exc:  # transformers validates configs with several error types, not all ValueError
            raise ConfigError(f"student.config: {' '.join(str(exc).split())[:300]}") from exc
    check_vocab(model, cache_vocab, len(tokenizer))
    return model


def student_positions(cfg: StudentConfig, local_dir: str | None = None) -> int | None:
    """The positions the student will have, read from its config alone (no weights); None where that config
    cannot be read yet (``build_student`` then says why)."""
    from transformers import AutoConfig

    try:
        if cfg.config:
            fields = dict(cfg.config)
            return max_positions(AutoConfig.for_model(fields.pop("model_type"), **fields))
        return max_positions(AutoConfig.from_pretrained(local_model(cfg.model or cfg.from_teacher, local_dir)))
    except Exception:  # transformers validates configs with several error types; build_student reports them
        return None


def check_vocab(model, cache_vocab: int, tokenizer_length: int) -> None:
    """The student must cover every real token; padded rows beyond the tokenizer are ignored by the loss."""
    student_vocab = model.get_output_embeddings().weight.shape[0]
    if student_vocab < tokenizer_length:
        raise ConfigError(
            f"the student's vocab size {student_vocab} is smaller than the cache's tokenizer ({tokenizer_length} tokens; "
            f"the cache's teacher outputs {cache_vocab}); give the student vocab_size >= {tokenizer_length}"
        )
