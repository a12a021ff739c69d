"""Whether a checkpoint may be resumed by this job: the same global batch and the same result-changing settings.

A checkpoint records the settings it was trained with. Keys that only change
how a run is observed or spread (logging, evaluation and checkpoint cadence,
DataLoader workers, device, strategy, and the split of the global batch into
ranks, micro-batches and accumulation) may differ on resume; any other change
would silently continue one run under another's settings, so it is refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipeline.errors import ConfigError
from storage.stream import StreamOrder

FREE_ON_RESUME = {"train.log_every", "train.eval_every", "train.eval_batches", "train.num_workers", "train.strategy",
                  "train.batch_size", "train.grad_accum", "train.checkpoint_every", "train.keep_checkpoints",
                  "train.resume", "train.out_dir", "device", "cache.verify", "data.num_proc", "data.streaming"}
"""Keys that may change between a checkpoint and its resume (the global batch is checked on its own)."""


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and name not in ("student.config",):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value, sort_keys=True)
    return flat


def result_settings(config_yaml: str) -> dict[str, str]:
    """Every setting of a resolved job config that changes what training produces, as ``key -> JSON value``."""
    return {k: v for k, v in _flatten(yaml.safe_load(config_yaml)).items() if k not in FREE_ON_RESUME}


def check_resumable(path: Path, state: dict, order: StreamOrder, settings: dict[str, str]) -> None:
    """Refuse a checkpoint from another configuration, or whose global batch differs from this job's."""
    if "global_batch" not in state or "settings" not in state:
        raise ConfigError(f"checkpoint {path} predates elastic resume and settings checks; "
                          "train into a new train.out_dir or set train.resume=never")
    changed = sorted(k for k in {*settings, *state["settings"]} if settings.get(k) != state["settings"].get(k))
    if changed:
        diff = "; ".join(f"{k}: {state['settings'].get(k, 'unset')} -> {settings.get(k, 'unset')}" for k in changed)
        raise ConfigError(f"checkpoint {path} was trained with other settings ({diff}); resuming would mix two "
                          "configurations: set train.resume=never to start over, or use a new train.out_dir")
    if state["global_batch"] != order.global_batch:
        raise ConfigError(
            f"checkpoint {path} was trained with a global batch of {state['global_batch']} (batch_size "
            f"{state['batch_size']} x world size {state['world_size']} x grad_accum {state['grad_accum']}), but this job's "
            f"is {order.global_batch} (batch_size {order.batch_size} x world size {order.world_size} x grad_accum "
            f"{order.grad_accum}); keep the product equal, e.g. grad_accum="
            f"{state['global_batch'] / (order.batch_size * order.world_size):g}, or train into a new train.out_dir")
