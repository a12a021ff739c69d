"""The storage section's settings, and what each one stores of a teacher's logits: its layout and its targets.

A setting is a flat dict: ``format`` (arrow or zarr), ``format_version`` (2 or 3), ``mode``, ``k`` (top-k
slots; in sample mode the draws N, as the tables always showed it), ``samples`` (draws per position, 0 in
top-k mode), ``logprob_bits`` (16 or 8 for a head's log-probs; None in sample mode, which stores counts) and
``level`` (zstd).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from pipeline.cache.config import CacheConfig
from pipeline.cache.reduce import hybrid_draws, sample_draws, sequence_uniforms, slot_width, topk_targets
from pipeline.cache.teacher_pass import HEAD_FIELDS, SAMPLE_FIELDS, TARGET_DTYPES
from storage import Layout

DEFAULT_LEVEL = {f.name: f.default for f in dataclasses.fields(CacheConfig)}["compression_level"]
LEVELS = (1, 3, 19)
"""The zstd levels tried, besides ``cache.compression_level``'s default, on top-64 and sample-50 Arrow caches."""


def setting(backend: str, mode: str, k: int, version: int, bits: int | None, level: int = DEFAULT_LEVEL,
            samples: int | None = None) -> dict:
    draws = 0 if mode == "topk" else (k if mode == "sample" else samples)
    return {"format": backend, "format_version": version, "mode": mode, "k": k, "samples": draws,
            "logprob_bits": None if mode == "sample" else bits, "level": level}


def versions(mode: str) -> list[tuple[int, int | None]]:
    """(format_version, logprob_bits) pairs a mode is measured at: format 2, and format 3 at 16 and 8 bits
    (sample mode stores counts, no log-probs, so it has no 8-bit variant)."""
    return [(2, 16), (3, 16)] + ([(3, 8)] if mode != "sample" else [])


def default_settings() -> list[dict]:
    """Every mode at format 2 and 3 (Arrow, the default zstd level), Zarr for top-64 and sample-50, then the other
    zstd levels."""
    modes = [("topk", k, None) for k in (8, 32, 64, 128)] + [("sample", 50, None), ("sample", 100, None),
                                                             ("hybrid", 8, 24)]
    settings = [setting("arrow", mode, k, v, bits, samples=n) for mode, k, n in modes for v, bits in versions(mode)]
    swept = (("topk", 64), ("sample", 50))
    settings += [setting("zarr", mode, k, v, bits) for mode, k in swept for v, bits in versions(mode)]
    settings += [setting("arrow", mode, k, v, bits, level) for mode, k in swept for v, bits in versions(mode)
                 for level in LEVELS]
    return settings


def setting_layout(s: dict, vocab_size: int) -> Layout:
    """The layout stage 1 would plan for ``s`` (``pipeline.cache.plan.make_plan``)."""
    head = 0 if s["mode"] == "sample" else s["k"]
    width = slot_width(s["mode"], s["k"], s["samples"], vocab_size)
    return Layout(s["format_version"], s["mode"], vocab_size, head, width - head, s["samples"],
                  s["logprob_bits"] or 16)


def target_key(s: dict) -> tuple:
    """What a setting's targets depend on (not its format, version, bits or level)."""
    return s["mode"], s["k"], s["samples"]


def setting_targets(teacher_logits: torch.Tensor, s: dict, layout: Layout, input_ids: np.ndarray) -> dict:
    """The targets (``storage.codec.targets``) stage 1 would store for (B, T) ``input_ids`` whose (B * T, V) teacher
    logits are given, at temperature 1 and seed 0 (``pipeline.cache.teacher_pass.batch_targets``)."""
    n, seq_len = input_ids.shape
    if s["mode"] == "topk":
        parts = dict(zip(HEAD_FIELDS, topk_targets(teacher_logits, s["k"], 1.0)))
    else:
        # Multinomial, the default draws (``cache.sampler``).
        uniforms = torch.cat([sequence_uniforms(0, 0, i, seq_len, s["samples"], "multinomial") for i in range(n)])
        if s["mode"] == "hybrid":
            parts = dict(zip(HEAD_FIELDS + SAMPLE_FIELDS,
                             hybrid_draws(teacher_logits, s["k"], uniforms, 1.0, layout.sample_width)))
        else:
            parts = dict(zip(SAMPLE_FIELDS, sample_draws(teacher_logits, uniforms, 1.0, layout.sample_width)))
    targets = {"input_ids": input_ids.astype(np.int32), "loss_mask": np.ones((n, seq_len), dtype=np.uint8)}
    for name, value in parts.items():
        targets[name] = value.to(TARGET_DTYPES[name]).reshape(n, seq_len, *value.shape[1:]).numpy()
    return targets
