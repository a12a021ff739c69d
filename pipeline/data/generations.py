"""A generation folder (``distillery generate``) as data: its rows become documents whose targets are the
completions only.

``data.path`` may name a finished generation folder. Its manifest says the format; ``data.format`` and the
column keys are not used. When the tokenizer is the generating model's, each document is the row's own
``prompt_ids`` then ``completion_ids`` (its stop token included), so the teacher scores exactly the tokens the
model wrote; otherwise the row's text is encoded again (the prompt as context, the completion as targets), and
the EOS that ends the document is a target only where the model stopped, not where ``max_new_tokens`` cut it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.load import quiet_datasets
from pipeline.errors import DataError
from pipeline.models.hf import tokenizer_sha256
from storage import MANIFEST_NAME, CacheError, Mirror, is_url, local_folder, read_folder_manifest, tree_sha256

TEXT_COLUMNS = {"chat": ["messages"], "prompt_response": ["prompt", "response"], "text": ["prompt", "response"]}


@dataclass(frozen=True)
class Generation:
    path: Path
    record: dict
    """The generation's manifest (without its shards)."""
    files: list[str]
    """Its shards, in order."""

    @property
    def identity(self) -> dict:
        """What names the generation in a cache's manifest and fingerprint."""
        return {"fingerprint": self.record["fingerprint"], "manifest_sha256": self.record.get("manifest_sha256"),
                "model": self.record.get("model", {}).get("name"), "rows": self.record.get("rows")}

    @property
    def columns(self) -> list[str]:
        return ["prompt_ids", "completion_ids", "finish_reason", *TEXT_COLUMNS[self.record["data"]["format"]]]


_COPIES: dict[str, Path] = {}
"""Local copies of generation folders at URLs, one download per process."""


def _local(path: str) -> Path | None:
    """The local folder of ``path``: itself, or a copy of a generation folder at a URL (None for a URL that holds
    no manifest, which is then left alone)."""
    if not is_url(path):
        return Path(path).expanduser()
    if path not in _COPIES:
        if not Mirror(path).exists(MANIFEST_NAME):
            return None
        _COPIES[path] = local_folder(path)
    return _COPIES[path]


def open_generation(path: str | None, key: str = "data.path", verify: bool = False) -> Generation | None:
    """The finished generation folder at ``path`` (a directory or a URL, read through a local copy), or None when
    ``path`` is not one; with ``verify``, every shard is hashed against the manifest first."""
    local = _local(path) if path else None
    if local is None or not (local / MANIFEST_NAME).is_file():
        return None
    try:
        record, shards = read_folder_manifest(local)
    except CacheError as exc:
        raise DataError(f"{key} {path}: {exc}") from None
    if record.get("kind") != "generation":
        return None
    if verify:
        bad = [s.path for s in shards if not (local / s.path).is_file() or tree_sha256(local / s.path) != s.sha256]
        if bad:
            raise DataError(f"{key} {path}: shard {bad[0]} is missing or does not match its sha256 in the manifest; "
                            "the generation is damaged: run `distillery generate` for it again")
    return Generation(local, record, [str(local / s.path) for s in shards])


def generation_documents(generation: Generation, split: str):
    """The rows of a (verified) generation as a ``datasets.Dataset`` of the columns its encoder reads."""
    import datasets

    with quiet_datasets():
        rows = datasets.load_dataset("parquet", data_files={split: generation.files}, split=split)
    return rows.select_columns(generation.columns)


def generation_encoder(generation: Generation, tokenizer) -> Callable[[dict], dict]:
    """A batched encoder of generation rows: ``ids``, ``targets`` (the completion) and ``eos_targets``."""
    same = generation.record.get("tokenizer", {}).get("sha256") == tokenizer_sha256(tokenizer)
    chat = generation.record["data"]["format"] == "chat"

    def texts(batch: dict) -> tuple[list[str], list[str]]:
        if not chat:
            return batch["prompt"], batch["response"]
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("a chat generation needs a tokenizer with a chat_template; this tokenizer has none")
        prompts = [tokenizer.apply_chat_template(m[:-1], tokenize=False, add_generation_prompt=True)
                   for m in batch["messages"]]
        return prompts, [m[-1]["content"] for m in batch["messages"]]

    def encode(batch: dict) -> dict:
        stopped = [int(reason == "eos") for reason in batch["finish_reason"]]
        if same:  # the tokens as written, the stop token included: the packer's EOS then only separates rows
            prompts, completions, eos_targets = batch["prompt_ids"], batch["completion_ids"], [0] * len(stopped)
        else:  # text has no stop token: the packer's EOS stands for it where the model stopped
            prompt_text, completion_text = texts(batch)
            prompts = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            completions = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
            eos_targets = stopped
        return {"ids": [list(p) + list(c) for p, c in zip(prompts, completions)],
                "targets": [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)],
                "eos_targets": eos_targets}

    return encode
