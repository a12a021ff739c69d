"""Distillery: offline knowledge distillation for causal language models.

The public Python API is what ``pipeline.api`` lists in its ``__all__``, re-exported here: ``load_job`` and the
job classes (``CacheJob``, ``GenerateJob``, ``TrainJob``, ``RunJob``, ``LossConfig``), the stage functions
(``run_cache``, ``run_generate``, ``run_train``, ``run_pipeline``), and ``CacheDataset``, ``collate`` and
``kd_loss`` for training in another loop. Every other module and name of ``pipeline`` (and of ``storage``) is
private and may change in any release. The names load on first use, so ``import pipeline`` and the CLI stay fast.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = ("CacheDataset", "CacheJob", "GenerateJob", "LossConfig", "RunJob", "TrainJob", "collate", "kd_loss",
           "load_job", "run_cache", "run_generate", "run_pipeline", "run_train")
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module("pipeline.api"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return [*__all__, "__version__"]
