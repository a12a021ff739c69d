"""What the models of a run write: greedy continuations of a few held-out prompts, for the run report.

A table of KL and chrF says how far a student is from its teacher; reading what each writes on the same
prompts says what that distance looks like. Every model of the run (its teachers and each round's student)
continues the first ``PROMPTS`` held-out prompts of every round's data (``held_out_prompts``, as the task score
reads them; a ``text`` document is cut to its first ``TEXT_PROMPT_WORDS`` words), greedily, ``NEW_TOKENS``
tokens. Rounds whose held-out prompts are the same share one set.

The texts are kept in ``continuations.json`` in the run directory, each under a key of the model's files (their
names, sizes and modification times), the prompts and the decoding: re-rendering a report decodes again only
for a model that changed.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.config_loading import build_config
from pipeline.data.config import DataConfig
from pipeline.data.prompts import Prompt, check_lengths
from pipeline.errors import DataError
from pipeline.generate.task import complete, held_out_prompts
from pipeline.log import get_logger
from pipeline.models.decode import Sampling
from pipeline.models.device import resolve_device
from pipeline.models.hf import (
    WEIGHT_PATTERNS,
    load_config_and_tokenizer,
    load_model,
    max_positions,
    tokenizer_sha256,
)
from pipeline.rounds.config import RunJob, round_data
from storage import write_text

CONTINUATIONS_NAME = "continuations.json"
PROMPTS = 3
"""Held-out prompts of each set that every model continues."""
NEW_TOKENS = 32
"""Greedy tokens each model writes per prompt (fewer where it ends with EOS)."""
TEXT_PROMPT_WORDS = 24
"""A ``text`` document is cut to its first words: the prompt is its opening, the continuation the rest."""
log = get_logger("report")


@dataclass(frozen=True)
class Speaker:
    """One model of the report: ``label`` (``teacher``, ``round 2 student``) and what ``load_model`` loads."""

    label: str
    model: str
    """A local folder (the copy of one at a URL) or a hub id."""
    gguf_file: str | None = None


@dataclass
class PromptSet:
    """The held-out prompts shared by ``rounds``, and every speaker's continuations of them."""

    rounds: list[int]
    format: str
    """The rounds' ``data.format``."""
    shown: list[str]
    """Each prompt as a reader sees it: the last user turn of a chat, the prompt, or the opening of a text."""
    references: list[str | None]
    """The data's own answers, where it has them."""
    written: dict[str, list[str] | None] = field(default_factory=dict)
    """Speaker label -> one continuation per prompt; None where the speaker cannot read the prompts (a chat
    prompt for a tokenizer without a chat template, a prompt longer than its positions)."""


def _shown(prompt: Prompt) -> str:
    if "messages" in prompt.source:
        return str(prompt.source["messages"][-1].get("content", ""))
    return prompt.source["prompt"]


def _cut(data: DataConfig, prompts: list[Prompt], tokenizer) -> list[Prompt]:
    """``text`` prompts cut to their first ``TEXT_PROMPT_WORDS`` words (the others as they are)."""
    if data.format != "text":
        return prompts
    cut = []
    for prompt in prompts:
        text = " ".join(prompt.source["prompt"].split()[:TEXT_PROMPT_WORDS])
        cut.append(Prompt(prompt.index, tuple(tokenizer(text, add_special_tokens=False)["input_ids"]),
                          {"prompt": text}, None))
    return cut


class PromptReader:
    """The held-out prompts of some data as one tokenizer gives them, each read once: the models of a run
    mostly share one tokenizer, and reading held-out prompts reads the whole data."""

    def __init__(self):
        self.read: dict[tuple[str, str, str], list[Prompt]] = {}

    def __call__(self, data: DataConfig, tokenizer) -> list[Prompt]:
        key = (json.dumps(asdict(data), sort_keys=True, default=str), tokenizer_sha256(tokenizer),
               str(getattr(tokenizer, "chat_template", None)))
        if key not in self.read:
            self.read[key] = _cut(data, held_out_prompts(data, tokenizer, PROMPTS), tokenizer)
        return self.read[key]


def _identity(speaker: Speaker) -> str:
    """What decides a speaker's writing besides the prompts: the name, size and modification time of its config
    and weight files (hashing a large teacher's weights on every report would cost more than decoding), or a hub
    id's name."""
    folder = Path(speaker.model).expanduser()
    if not folder.is_dir():
        return f"{speaker.model}:{speaker.gguf_file}"
    files = [folder / speaker.gguf_file] if speaker.gguf_file else [
        folder / "config.json", *(p for pattern in WEIGHT_PATTERNS for p in sorted(folder.glob(pattern)))]
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()]
    return json.dumps([str(folder.resolve()), stats])


def _key(identity: str, prompts: str) -> str:
    text = json.dumps([identity, prompts, NEW_TOKENS], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _prompt_sets(job: RunJob, rounds: list[int], tokenizer, prompts_of: PromptReader,
                 ) -> dict[str, tuple[PromptSet, DataConfig]]:
    """The distinct held-out prompt sets of ``rounds`` by their sources and format (a round without held-out
    data, or whose prompts ``tokenizer`` cannot render, has none)."""
    sets: dict[str, tuple[PromptSet, DataConfig]] = {}
    for index in rounds:
        data = build_config(DataConfig, round_data(job, index))
        if not (data.holdout_fraction > 0 or data.eval_path):
            continue
        try:
            prompts = prompts_of(data, tokenizer)
        except DataError as exc:
            log.warning(f"round {index}'s held-out prompts are not shown: {exc}")
            continue
        sources = json.dumps([data.format, [p.source for p in prompts]], ensure_ascii=False, sort_keys=True)
        if sources in sets:
            sets[sources][0].rounds.append(index)
        else:
            shown = [_shown(p) for p in prompts]
            sets[sources] = (PromptSet([index], data.format, shown, [p.reference for p in prompts]), data)
    return sets


def _write(speaker: Speaker, data_sets: list[DataConfig], prompts_of: PromptReader, device,
           ) -> list[list[str] | None]:
    """The speaker's greedy continuations of every set's prompts (None for a set it cannot read)."""
    config, tokenizer = load_config_and_tokenizer(speaker.model, gguf_file=speaker.gguf_file, key=speaker.label)
    model = load_model(speaker.model, device, key=speaker.label, gguf_file=speaker.gguf_file)
    written = []
    for data in data_sets:
        try:
            prompts = prompts_of(data, tokenizer)
            check_lengths(prompts, NEW_TOKENS, max_positions(config))
        except DataError:
            written.append(None)
            continue
        completions = complete(model, tokenizer, prompts, Sampling(NEW_TOKENS, 0.0, 1.0, 0))
        written.append([tokenizer.decode(c.ids, skip_special_tokens=True).strip() for c in completions])
    return written


def _read_kept(path: Path) -> dict[str, list[str] | None]:
    """The kept texts by key; none from a file that is missing or damaged (they are decoded again)."""
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    entries = kept.get("continuations") if isinstance(kept, dict) else None
    readable = {key: entry for key, entry in (entries or {}).items() if isinstance(entry, dict) and "texts" in entry}
    return {key: entry["texts"] for key, entry in readable.items() if isinstance(entry["texts"], list | None)}


def continuations(job: RunJob, rounds: list[int], speakers: list[Speaker], run_dir: Path) -> list[PromptSet]:
    """Every speaker's continuations of the held-out prompt sets of ``rounds``; reads and rewrites
    ``run_dir/continuations.json``, which keeps the texts shown (by key, with the speaker and rounds named)."""
    if not speakers:
        return []
    _, tokenizer = load_config_and_tokenizer(speakers[0].model, gguf_file=speakers[0].gguf_file,
                                             key=speakers[0].label)
    prompts_of = PromptReader()
    sets = _prompt_sets(job, rounds, tokenizer, prompts_of)
    path = run_dir / CONTINUATIONS_NAME
    kept, used = _read_kept(path), {}
    device = resolve_device(job.device)
    for speaker in speakers:
        identity = _identity(speaker)
        keys = [_key(identity, sources) for sources in sets]
        if not all(key in kept for key in keys):
            kept.update(zip(keys, _write(speaker, [data for _, data in sets.values()], prompts_of, device)))
        for (prompt_set, _), key in zip(sets.values(), keys):
            prompt_set.written[speaker.label] = kept[key]
            used[key] = {"model": speaker.label, "rounds": prompt_set.rounds, "texts": kept[key]}
    write_text(path, json.dumps({"new_tokens": NEW_TOKENS, "continuations": used}, indent=2, ensure_ascii=False)
               + "\n")
    return [prompt_set for prompt_set, _ in sets.values()]
