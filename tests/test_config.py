"""Config loading: overrides, typed validation, every shipped YAML, and docs coverage of every key."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from pipeline.cache.config import CacheJob
from pipeline.config_loading import load_config, parse_overrides, read_yaml, to_yaml
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ["teacher.model=m", "data.path=d", "cache.dir=c"]


def all_keys(cls, prefix="") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        optional = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]  # ``X | None``: X's keys too
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, f"{prefix}{field.name}.")
        else:
            keys.append(prefix + field.name)
            keys += all_keys(optional[0], f"{prefix}{field.name}.") if optional else []
    return keys


def test_overrides_parse_yaml_values():
    assert parse_overrides(["a.b=3", "a.c=true", "d=null", "e=1.5", "f=text"]) == {
        "a": {"b": 3, "c": True}, "d": None, "e": 1.5, "f": "text"}
    with pytest.raises(ConfigError, match="not of the form"):
        parse_overrides(["novalue"])


def test_overrides_alone_build_a_config():
    job = load_config(CacheJob, None, [*REQUIRED, "cache.top_k=32", "cache.temperature=2", "cache.mode=topk"])
    assert job.cache.top_k == 32 and job.cache.temperature == 2.0 and isinstance(job.cache.temperature, float)


def test_override_beats_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("teacher: {model: m}\ndata: {path: d, seq_len: 128}\ncache: {dir: c}\n")
    assert load_config(CacheJob, path, ["data.seq_len=64"]).data.seq_len == 64


def test_resolved_config_round_trips(tmp_path):
    job = load_config(CacheJob, None, [*REQUIRED, "data.holdout_fraction=0.1"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(job))
    assert load_config(CacheJob, path, []) == job


def test_literal_and_bool_types_are_checked():
    with pytest.raises(ConfigError) as info:
        load_config(CacheJob, None, [*REQUIRED, "cache.format=parquet", "teacher.trust_remote_code=yes please",
                                     "device=tpu"])
    message = str(info.value)
    assert "cache.format: 'parquet' is not one of 'arrow' | 'zarr'" in message
    assert "teacher.trust_remote_code: expected bool" in message


def test_device_is_validated():
    with pytest.raises(ConfigError, match="device: must be auto, cpu, cuda or cuda:N"):
        load_config(CacheJob, None, [*REQUIRED, "device=tpu"])


def test_missing_required_keys_are_named():
    with pytest.raises(ConfigError) as info:
        load_config(CacheJob, None, [])
    for key in ("teacher.model", "data.path", "cache.dir"):
        assert key in str(info.value)


def job_class(data: dict):
    from pipeline.generate.config import GenerateJob
    from pipeline.rounds.config import RunJob
    from pipeline.train.config import PretrainJob, TrainJob

    if "rounds" in data or "on_policy" in data:
        return RunJob
    if "generate" in data:
        return GenerateJob
    if "tokenizer" in data:
        return PretrainJob
    return TrainJob if "train" in data else CacheJob


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    data = read_yaml(path)
    assert data, f"{path} is empty"
    load_config(job_class(data), path, [])


def test_every_key_has_a_docstring_and_a_row_in_the_generated_reference():
    """The config reference (docs/reference/config.md) is rendered from the same rows as ``--help``."""
    import importlib.util

    from pipeline.config_loading import describe_keys
    from pipeline.generate.config import GenerateJob
    from pipeline.rounds.config import RunJob
    from pipeline.train.config import PretrainJob, TrainJob

    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    sections = {job_class: hooks.render_job(command, job_class, text) for command, job_class, text in hooks.jobs()}
    for job_class in (CacheJob, GenerateJob, TrainJob, PretrainJob, RunJob):
        assert job_class in sections, f"docs/hooks.py renders no table for {job_class.__name__}"
        rows = describe_keys(job_class)
        assert sorted(key for key, *_ in rows) == sorted(all_keys(job_class))
        undocumented = [key for key, _, _, doc in rows if not doc.strip()]
        assert not undocumented, f"{job_class.__name__}: no docstring under {undocumented}"
        missing = [key for key in all_keys(job_class) if f"<tr><td><code>{key}</code></td>" not in sections[job_class]]
        assert not missing, f"the generated reference of {job_class.__name__} lacks {missing}"
    assert hooks.MARKER in (ROOT / "docs" / "reference" / "config.md").read_text()
