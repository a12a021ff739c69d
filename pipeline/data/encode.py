"""Turn documents into token ids plus a per-token *target* mask, for each ``data.format``.

``text``: every token is a target. ``prompt_response``: only the response's
tokens are. ``chat``: only the assistant turns of ``messages`` (rendered with
the tokenizer's chat template) are. The EOS that ends a document is a target
when the document has any target, so a student learns where answers stop.
"""
from __future__ import annotations

from collections.abc import Callable

from pipeline.data.config import DataConfig
from pipeline.data.generations import generation_encoder, open_generation
from pipeline.errors import DataError


def required_columns(cfg: DataConfig) -> dict[str, str]:
    """The dataset columns this format reads, keyed by the config key that names each."""
    if cfg.format == "chat":
        return {"messages_field": cfg.messages_field}
    if cfg.format == "prompt_response":
        return {"prompt_field": cfg.prompt_field, "response_field": cfg.response_field}
    return {"text_field": cfg.text_field}


def _text(tokenizer, cfg: DataConfig):
    def encode(batch):
        ids = tokenizer(batch[cfg.text_field], add_special_tokens=False)["input_ids"]
        return {"ids": ids, "targets": [[1] * len(x) for x in ids]}

    return encode


def _prompt_response(tokenizer, cfg: DataConfig):
    def encode(batch):
        prompts = tokenizer(batch[cfg.prompt_field], add_special_tokens=False)["input_ids"]
        responses = tokenizer(batch[cfg.response_field], add_special_tokens=False)["input_ids"]
        return {"ids": [p + r for p, r in zip(prompts, responses)],
                "targets": [[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)]}

    return encode


def _assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise DataError("the tokenizer's chat template does not render conversations prefix by prefix; "
                            "data.format=chat cannot locate the assistant turns")
        spans.append((len(before), len(through)))
    return text, spans


def _chat(tokenizer, cfg: DataConfig):
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("data.format=chat needs a tokenizer with a chat_template; this tokenizer has none")

    def encode(batch):
        all_ids, all_targets = [], []
        for messages in batch[cfg.messages_field]:
            text, spans = _assistant_spans(tokenizer, messages)
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            all_ids.append(encoded["input_ids"])
            all_targets.append([int(any(lo <= start < hi for lo, hi in spans)) for start, _ in encoded["offset_mapping"]])
        return {"ids": all_ids, "targets": all_targets}

    return encode


def make_encoder(cfg: DataConfig, tokenizer) -> Callable[[dict], dict]:
    """A batched ``datasets.map`` function returning ``ids`` and ``targets`` lists per document (and, for a
    generation folder, ``eos_targets``)."""
    generation = open_generation(cfg.path)
    if generation is not None:
        return generation_encoder(generation, tokenizer)
    return {"text": _text, "prompt_response": _prompt_response, "chat": _chat}[cfg.format](tokenizer, cfg)
