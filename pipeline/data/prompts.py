"""The prompts of a generation: read with ``data.*``, rendered and tokenized as the model will see them.

``chat``: the turns up to the last user turn, rendered with the chat template and its generation prompt; an
assistant turn after it is the reference. ``prompt_response``: ``prompt_field``, with ``response_field`` as the
reference where the data has it. ``text``: the whole text, with no reference.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from pipeline.data.config import DataConfig
from pipeline.data.load import count_documents, document_batches, load_documents
from pipeline.data.sources import BATCH_DOCUMENTS, holdout_indices
from pipeline.errors import DataError


@dataclass(frozen=True)
class Prompt:
    index: int
    """The prompt's place in the data (0-based): with the sample index, it names a row and seeds its draws."""
    ids: tuple[int, ...]
    """The exact tokens the model is given."""
    source: dict
    """What the row repeats of the prompt: ``{"messages": [...]}`` for chat, ``{"prompt": ...}`` otherwise."""
    reference: str | None
    """The source's own answer, when it has one."""


def _chat_prompt(messages: list[dict], index: int, field: str) -> tuple[list[dict], str | None]:
    """The turns up to the last user turn, and the content of an assistant turn right after it."""
    users = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise DataError(f"{field}: conversation {index} has no user turn to answer; give each a user turn")
    last = users[-1]
    after = messages[last + 1] if last + 1 < len(messages) else None
    reference = after.get("content") if isinstance(after, dict) and after.get("role") == "assistant" else None
    return messages[: last + 1], reference


def _encode(cfg: DataConfig, tokenizer, document: dict, index: int, section: str) -> Prompt:
    if cfg.format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{section}.format=chat needs a tokenizer with a chat_template; this tokenizer has none")
        turns, reference = _chat_prompt(document[cfg.messages_field], index, f"{section}.messages_field")
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        source = {"messages": turns}
    else:
        field = cfg.prompt_field if cfg.format == "prompt_response" else cfg.text_field
        text = document[field]
        reference = document.get(cfg.response_field) if cfg.format == "prompt_response" else None
        source = {"prompt": text}
    ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise DataError(f"{section}.path: prompt {index} is empty; remove it or give it text")
    return Prompt(index, ids, source, reference)


def load_prompts(cfg: DataConfig, tokenizer, max_prompts: int | None, first: int = 0,
                 split: str = "train", section: str = "data") -> list[Prompt]:
    """``max_prompts`` prompts of ``split`` (all when None) from its ``first`` on, in data order.

    ``train`` leaves out the documents that ``data.holdout_fraction`` holds out, so that nothing trained on is
    scored; ``eval`` takes only those, or ``data.eval_path``. A prompt keeps its index in the whole data.
    ``section`` names where ``cfg`` sits in the config, for the messages of errors."""
    column = {"chat": "messages_field", "prompt_response": "prompt_field", "text": "text_field"}[cfg.format]
    optional = (cfg.response_field,) if cfg.format == "prompt_response" else ()
    separate = split == "eval" and cfg.eval_path
    path, key = (cfg.eval_path, f"{section}.eval_path") if separate else (cfg.path, f"{section}.path")
    documents = load_documents(path, cfg.eval_split or cfg.split if separate else cfg.split,
                               {column: getattr(cfg, column)}, cfg.streaming, key, optional=optional)
    held = None
    if cfg.holdout_fraction > 0:
        held = set(holdout_indices(count_documents(documents, BATCH_DOCUMENTS), cfg.holdout_fraction, cfg.seed).tolist())
    elif split == "eval" and not separate:
        raise DataError(f"held-out prompts need {section}.holdout_fraction > 0 or {section}.eval_path; set one of them")
    prompts: list[Prompt] = []
    rows = (dict(zip(batch, values)) for batch in document_batches(documents, 256) for values in zip(*batch.values()))
    in_split = ((i, row) for i, row in enumerate(rows) if held is None or (i in held) == (split == "eval"))
    for position, (index, row) in enumerate(in_split):
        if max_prompts is not None and len(prompts) >= max_prompts:
            break
        if position >= first:
            prompts.append(_encode(cfg, tokenizer, row, index, section))
    if not prompts:
        raise DataError(f"{key} {path!r} holds no {split} prompts from prompt {first} on")
    return prompts


def check_lengths(prompts: list[Prompt], max_new_tokens: int, positions: int | None,
                  keys: tuple[str, str] = ("data.path", "generate.max_new_tokens")) -> None:
    """Refuse a prompt that leaves no room for ``max_new_tokens`` within the model's positions; ``keys`` name the
    settings of the prompts and of ``max_new_tokens`` in the message."""
    if positions is None:
        return
    path, tokens = keys
    for prompt in prompts:
        if len(prompt.ids) + max_new_tokens > positions:
            raise DataError(f"{path}: prompt {prompt.index} has {len(prompt.ids)} tokens, and with "
                            f"{tokens}={max_new_tokens} it exceeds the model's {positions} positions; "
                            f"shorten the prompt or lower {tokens}")


def prompts_sha256(prompts: list[Prompt]) -> str:
    """The fingerprint of the prompts: their tokens, sources and references, in order."""
    text = json.dumps([[p.index, list(p.ids), p.source, p.reference] for p in prompts], sort_keys=True,
                      ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
