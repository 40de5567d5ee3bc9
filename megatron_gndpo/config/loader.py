"""YAML -> :class:`RunConfig`, with ``defaults:`` inheritance and dotted CLI overrides.

Strict: an unknown key is an error naming its dotted path, so a typo never silently falls back
to a default.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Mapping, Sequence

import yaml

from megatron_gndpo.config.schema import RunConfig


def _deep_merge(base: dict, override: Mapping) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml_with_defaults(path: str | os.PathLike) -> dict:
    """Read ``path``; a top-level ``defaults:`` (a path or a list of paths, relative to the file)
    is loaded first and this file's keys are merged over it."""
    path = os.fspath(path)
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    parents = raw.pop("defaults", None) or []
    if isinstance(parents, str):
        parents = [parents]
    merged: dict = {}
    for parent in parents:
        merged = _deep_merge(merged, load_yaml_with_defaults(os.path.join(os.path.dirname(path), parent)))
    return _deep_merge(merged, raw)


def apply_overrides(tree: dict, overrides: Sequence[str]) -> dict:
    """``["trainer.steps=10", "model.qk_layernorm=true"]``; values are parsed as YAML scalars."""
    tree = dict(tree)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like dotted.key=value")
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, Mapping) else {}
            node = node[part]
        node[parts[-1]] = yaml.safe_load(value)
    return tree


def _build(cls, data: Any, path: str):
    if not isinstance(data, Mapping):
        raise ValueError(f"{path or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = path + "." if path else ""
        raise ValueError(f"unknown config key {where}{unknown[0]} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{path}.{name}" if path else name)
    return cls(**kwargs)


def _convert(tp, value, path):
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, path)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ValueError(f"config key {path} must be {tp.__name__}, got {value!r}")
    if origin is typing.Literal and value not in typing.get_args(tp):
        raise ValueError(f"config key {path} must be one of {typing.get_args(tp)}, got {value!r}")
    return value


def config_from_dict(tree: Mapping) -> RunConfig:
    return _build(RunConfig, tree, "")


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """The run's configuration: ``path`` (with its ``defaults:`` chain), then ``overrides``."""
    tree = load_yaml_with_defaults(path) if path else {}
    return config_from_dict(apply_overrides(tree, overrides))


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
