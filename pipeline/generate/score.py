"""Task scores of generated answers against their references: exact match and chrF.

chrF (Popović, 2015) is the F-score of character n-grams, n = 1..6: precision and recall averaged over n, then
combined with recall weighted by beta = 2; whitespace is left out, as sacrebleu's default does. A verse recited with one word wrong keeps most
of its n-grams, so chrF ranks near misses where exact match only counts perfect answers.
"""
from __future__ import annotations

from collections import Counter

ORDER = 6
BETA = 2.0


def _ngrams(text: str, n: int) -> Counter:
    chars = "".join(text.split())
    return Counter(chars[i : i + n] for i in range(len(chars) - n + 1))


def chrf(answer: str, reference: str) -> float:
    """chrF of ``answer`` against ``reference``, in [0, 1]: n-gram precision and recall each averaged over the
    orders both strings have, then their F-beta."""
    precisions, recalls = [], []
    for n in range(1, ORDER + 1):
        got, want = _ngrams(answer, n), _ngrams(reference, n)
        if not got or not want:
            continue
        overlap = sum((got & want).values())
        precisions.append(overlap / sum(got.values()))
        recalls.append(overlap / sum(want.values()))
    if not precisions:
        return float(answer.split() == reference.split())
    precision, recall = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    denominator = BETA**2 * precision + recall
    return (1 + BETA**2) * precision * recall / denominator if denominator else 0.0


def exact_match(answer: str, reference: str) -> bool:
    """The same words, whatever the spacing."""
    return answer.split() == reference.split()


def task_score(answers: list[str], references: list[str | None]) -> dict | None:
    """Mean exact match and chrF over the answers that have a reference; None when none has."""
    pairs = [(a, r) for a, r in zip(answers, references) if r is not None]
    if not pairs:
        return None
    return {"scored": len(pairs), "exact_match": sum(exact_match(a, r) for a, r in pairs) / len(pairs),
            "chrf": sum(chrf(a, r) for a, r in pairs) / len(pairs)}
