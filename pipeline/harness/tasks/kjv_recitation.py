"""The data and the scores of the ``kjv_recitation`` lm-eval task, which ``kjv_recitation.yaml`` names.

lm-eval loads this file by its path, beside the YAML. The data is the package's own recitations, read in memory:
no download, no datasets cache. The test split is the 5 % that ``data.holdout_fraction: 0.05`` (seed 0) holds out
of them, as the on-policy study does, so a student distilled on the recitations has never trained on a test verse.
Its distractors are held-out verses too, of the nearest held-out references, so that knowing what a verse sounds
like is not enough: the student must place the reference.
"""
from __future__ import annotations

import gzip
import json

from pipeline.data.sources import holdout_indices
from pipeline.demo.tokenizer import QA_CORPUS

HOLDOUT_FRACTION, HOLDOUT_SEED = 0.05, 0
"""The held-out recitations, as the on-policy study's ``data.holdout_fraction`` and ``data.seed`` choose them."""
CHOICES = 4
"""The right verse and the verses of the 3 nearest other held-out references (chance: 1/4)."""


def nearest_others(verses: list[str], index: int, count: int) -> list[int]:
    """The positions in ``verses`` of the ``count`` verses nearest ``index`` (after, then before, at each distance)
    that differ from ``verses[index]`` and from each other."""
    picked, seen = [], {verses[index]}
    for distance in range(1, len(verses)):
        for row in (index + distance, index - distance):
            if 0 <= row < len(verses) and verses[row] not in seen and len(picked) < count:
                picked.append(row)
                seen.add(verses[row])
        if len(picked) == count:
            break
    return picked


def recitations(**_metadata):
    """``{"train": ..., "test": ...}`` datasets of ``{"prompt", "choices", "gold"}`` rows. A test row holds its
    verse and those of the nearest other held-out references, ``gold`` the index of its own (each index in turn,
    though no score depends on the order): every choice is a verse no student of the recitations trained on, so
    none is favoured for being remembered. Train rows (the few-shot examples of ``--num-fewshot``) hold their own
    verse only. lm-eval passes the task's metadata, which is not needed."""
    from datasets import Dataset, DatasetDict

    with gzip.open(QA_CORPUS, "rt", encoding="utf-8") as source:
        rows = [json.loads(line) for line in source]
    held_out = holdout_indices(len(rows), HOLDOUT_FRACTION, HOLDOUT_SEED).tolist()
    unseen = [rows[index]["response"] for index in held_out]
    test, set_of_held_out = [], set(held_out)
    for position, index in enumerate(held_out):
        others, gold = nearest_others(unseen, position, CHOICES - 1), position % CHOICES
        options = [*others[:gold], position, *others[gold:]]
        test.append({"prompt": rows[index]["prompt"], "choices": [unseen[i] for i in options], "gold": gold})
    train = [{"prompt": row["prompt"], "choices": [row["response"]], "gold": 0}
             for index, row in enumerate(rows) if index not in set_of_held_out]
    return DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test)})


def process_results(doc: dict, results: list[tuple[float, bool]]) -> dict:
    """One prompt's scores from the log-likelihood (natural log) of each choice given the prompt: ``acc`` (the
    right verse is the likeliest), ``acc_norm`` (the likeliest per byte) and the right verse's
    ``(log-likelihood, bytes)``, which lm-eval's ``bits_per_byte`` aggregation sums over prompts."""
    likelihoods = [loglikelihood for loglikelihood, _ in results]
    sizes = [len(choice.encode("utf-8")) for choice in doc["choices"]]
    per_byte = [loglikelihood / size for loglikelihood, size in zip(likelihoods, sizes)]
    gold = doc["gold"]
    return {"acc": float(_argmax(likelihoods) == gold), "acc_norm": float(_argmax(per_byte) == gold),
            "bits_per_byte": (likelihoods[gold], sizes[gold])}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)
