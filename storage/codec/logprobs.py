"""Stored forms of the teacher's weights: log(count / N) for sampled ids, and 8-bit log-probs for a head.

8-bit log-probs are quantised per position, in log space: with ``offset`` the position's largest log-prob
and ``scale`` its range over ``LEVELS`` (both rounded to float16, the scale upwards), code
``c = round((offset - logprob) / scale)`` in 0..254 and ``logprob = offset - c * scale``; code 255 stands for
a log-prob of -inf. The error is at most half a step (``scale / 2``).
"""
from __future__ import annotations

import numpy as np

LEVELS = 254
NEG_INF_CODE = 255


def count_logprobs(counts: np.ndarray, samples: int, base: np.ndarray | None = None) -> np.ndarray:
    """float16 log(count / N) for (..., S) counts, -inf for count 0; ``base`` (...,) float32 is added first (a
    hybrid's tail mass). Format 2 stored exactly these values, so both formats read back the same bits."""
    with np.errstate(divide="ignore"):
        table = np.log(np.arange(samples + 1, dtype=np.float32) / np.float32(samples))
    values = table[counts]
    if base is not None:
        values = base[..., None] + values
    return values.astype(np.float16)


def quantize_logprobs(logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(..., K) float32 log-probs -> uint8 codes (..., K), float16 offset (...,) and float16 scale (...,)."""
    finite = np.isfinite(logprobs)
    top = np.where(finite, logprobs, -np.inf).max(axis=-1)
    bottom = np.where(finite, logprobs, np.inf).min(axis=-1)
    any_finite = finite.any(axis=-1)
    offset = np.where(any_finite, top, 0.0).astype(np.float16)
    span = np.where(any_finite, offset.astype(np.float32) - bottom, 0.0).clip(min=0.0) / LEVELS
    scale = span.astype(np.float16)
    short = scale.astype(np.float32) < span  # rounded down: the lowest log-prob would need code 255
    scale[short] = np.nextafter(scale[short], np.float16(np.inf))
    step = scale.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(step > 0, np.rint((offset.astype(np.float32)[..., None] - logprobs) / step), 0.0)
    codes = np.where(finite, codes.clip(0, LEVELS), NEG_INF_CODE).astype(np.uint8)
    return codes, offset, scale


def dequantize_logprobs(codes: np.ndarray, offset: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Undo ``quantize_logprobs``: (..., K) float32 log-probs."""
    values = offset.astype(np.float32)[..., None] - codes.astype(np.float32) * scale.astype(np.float32)[..., None]
    return np.where(codes == NEG_INF_CODE, -np.inf, values).astype(np.float32)
