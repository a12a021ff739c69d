"""Build typed dataclass configs from YAML plus ``key=value`` overrides.

Every problem (unknown key, wrong type, bad value) is collected and reported
in one ``ConfigError``, so a user fixes a config in one pass.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from pipeline.errors import ConfigError

T = TypeVar("T")


def parse_overrides(pairs: list[str]) -> dict:
    """Turn ``["cache.top_k=32", ...]`` into a nested dict; values are parsed as YAML."""
    tree: dict = {}
    problems = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {pair!r} is not of the form section.key=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as exc:
            problems.append(f"override {pair!r}: value is not valid YAML ({exc.problem})")
            continue
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override {pair!r} conflicts with another override of {part!r}")
                break
        else:
            node[leaf] = value
    if problems:
        raise ConfigError("invalid overrides:\n  - " + "\n  - ".join(problems))
    return tree


def merge(base: dict, update: dict) -> dict:
    """Recursively merge ``update`` into a copy of ``base``."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML: {getattr(exc, 'problem', exc)}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check ``value`` against annotation ``tp``; return it (converted where lossless)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where, problems)
    if origin is Literal:
        if value not in typing.get_args(tp):
            problems.append(f"{where}: {value!r} is not one of {_type_name(tp)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, problems)
    if origin in (dict, list):
        if not isinstance(value, origin):
            problems.append(f"{where}: expected a {origin.__name__}, got {value!r}")
        return value
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        problems.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type[T], data: Any, where: str, problems: list[str]) -> T | None:
    if not isinstance(data, dict):
        problems.append(f"{where or 'config'}: expected a mapping, got {data!r}")
        return None
    before = len(problems)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(names)})"
            problems.append(f"{full}: unknown key{hint}")
            continue
        kwargs[key] = _coerce(value, hints[key], full, problems)
    for name in names:
        if name not in kwargs and dataclasses.is_dataclass(hints[name]):
            # Build absent sections here so their problems carry the section's name.
            kwargs[name] = _build(hints[name], {}, f"{where}.{name}" if where else name, problems)
    if len(problems) > before:
        return None
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        problems.extend(f"{where}.{key}: {msg}" if where else f"{key}: {msg}" for key, msg in exc.problems)
        return None


def build_config(cls: type[T], data: dict) -> T:
    """Build ``cls`` from a nested dict, raising one ``ConfigError`` listing every problem."""
    problems: list[str] = []
    config = _build(cls, data, "", problems)
    if problems or config is None:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    return config


def load_config(cls: type[T], path: str | Path | None, overrides: list[str]) -> T:
    """Load ``cls`` from an optional YAML file with ``key=value`` overrides applied on top."""
    data = read_yaml(path) if path else {}
    return build_config(cls, merge(data, parse_overrides(overrides)))


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def need(ok: bool, key: str, message: str) -> tuple[str, str] | None:
    """A ``(key, message)`` problem when ``ok`` is false, for ``raise_problems``."""
    return None if ok else (key, message)


def device_problem(device: str) -> tuple[str, str] | None:
    """The check of every job's ``device`` key."""
    ok = device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
    return need(ok, "device", f"must be auto, cpu, cuda or cuda:N, got {device!r}")


def raise_problems(*checks: tuple[str, str] | None) -> None:
    """Raise every failed ``(key, message)`` check of a ``__post_init__`` as one ``ConfigError``.

    Passing checks are given as ``None``.
    """
    problems = [c for c in checks if c is not None]
    if problems:
        lines = "\n  - ".join(f"{key}: {msg}" for key, msg in problems)
        raise ConfigError("invalid config:\n  - " + lines, problems)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, read from its source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _optional_section(tp: Any) -> type | None:
    """The dataclass of an ``X | None`` annotation, or None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        sections = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return sections[0] if len(sections) == 1 and type(None) in typing.get_args(tp) else None
    return None


def describe_keys(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(key, type, default, doc)`` for every leaf key of a job dataclass, sections flattened with dots."""
    rows = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe_keys(tp, f"{prefix}{f.name}.")
            continue
        section = _optional_section(tp)
        if section:  # an optional section (``student.lora``): the section itself, then each of its keys
            rows.append((prefix + f.name, "section | null", "null", docs.get(f.name, "")))
            rows += describe_keys(section, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((prefix + f.name, _type_name(tp).replace("NoneType", "null"), yaml.safe_dump(default).strip()
                     .removesuffix("...").strip(), docs.get(f.name, "")))
    return rows
