"""YAML -> :class:`RunConfig`, with ``defaults:`` inheritance and dotted CLI overrides.

Strict: an unknown key is an error naming its dotted path, so a typo never silently falls back
to a default.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, List, Mapping, Sequence

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
        set_dotted(tree, key, yaml.safe_load(value))
    return tree


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """``tree[a][b][c] = value`` for ``key`` 'a.b.c', creating (copies of) the mappings on the way."""
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        node[part] = dict(child) if isinstance(child, Mapping) else {}
        node = node[part]
    node[parts[-1]] = value


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


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp, value, path):
    """``value`` checked against the field type ``tp`` (and converted where YAML is ambiguous: an int or
    "1e-3" for a float, one string for a list of strings), or a ValueError naming ``path``. bool is
    not accepted for int or float, although Python's bool is an int: ``steps: true`` is a mistake."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, path)
            except ValueError as e:
                errors.append(str(e))
        nullable = " (or null)" if type(None) in args else ""
        if len(errors) == 1:
            raise ValueError(errors[0] + nullable)
        raise ValueError(f"config key {path} must be {' or '.join(map(_type_name, options))}{nullable}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is typing.Literal:
        # exact types: True == 1 and 1 == 1.0, but neither is the value the schema lists
        if not any(type(value) is type(a) and value == a for a in args):
            raise ValueError(f"config key {path} must be one of {args}, got {value!r}")
        return value
    if origin in (list, tuple):
        item = args[0] if args else Any
        if isinstance(value, str) and item is str:
            value = [value]  # `train_files: data.parquet` means a list of one file
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {path} must be a list, got {value!r} ({type(value).__name__})")
        items = [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        key_tp, value_tp = args or (Any, Any)
        if not isinstance(value, Mapping):
            raise ValueError(f"config key {path} must be a mapping, got {value!r} ({type(value).__name__})")
        return {_convert(key_tp, k, f"{path} (key {k!r})"): _convert(value_tp, v, f"{path}.{k}")
                for k, v in value.items()}
    if tp is float:
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    if tp in (int, float) and isinstance(value, bool):
        raise ValueError(f"config key {path} must be {tp.__name__}, got {value!r} (a boolean)")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ValueError(f"config key {path} must be {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def with_checkpoint_architectures(tree: Mapping) -> dict:
    """``tree`` with ``model`` / ``teacher.model`` filled from ``student_checkpoint`` / ``teacher.checkpoint``:
    a config names checkpoints, data and hyper-parameters, and the architecture comes from the checkpoint's
    metadata. Fields the config states win (``max_position_embeddings`` to fit the run's lengths; any other
    that disagrees with the checkpoint is refused when the run checks the checkpoint's architecture). A
    checkpoint that does not exist yet (a config read before the job that writes it) contributes nothing
    here (nor does a directory that is not one); the run refuses it by name before building a model."""
    # Imported here: checkpoint.metadata imports config.schema, whose package imports this module.
    from megatron_gndpo.checkpoint.metadata import is_checkpoint, model_config_from_checkpoint

    out = dict(tree)
    teacher = out["teacher"] = dict(out.get("teacher") or {})
    for section, checkpoint in ((out, out.get("student_checkpoint")), (teacher, teacher.get("checkpoint"))):
        if checkpoint and is_checkpoint(checkpoint):
            saved = dataclasses.asdict(model_config_from_checkpoint(checkpoint))
            section["model"] = {**saved, **(section.get("model") or {})}
    return out


def config_from_dict(tree: Mapping) -> RunConfig:
    """The run's config, built, typed and checked: also the names of the algorithm's parts and the
    estimator's keyword arguments, on every rank, before any compute."""
    # Imported here: the algorithms import torch, which reading a config does not otherwise need.
    from megatron_gndpo.algorithms import check_algorithm

    cfg = _build(RunConfig, with_checkpoint_architectures(tree), "")
    check_algorithm(cfg.algorithm)
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """The run's configuration: ``path`` (with its ``defaults:`` chain), then ``overrides``."""
    tree = load_yaml_with_defaults(path) if path else {}
    return config_from_dict(apply_overrides(tree, overrides))


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_changes(old: Mapping, new: Mapping, prefix: str = "") -> List[str]:
    """``["trainer.steps: 2 -> 4", ...]``: every dotted key whose value differs between two config trees
    (``config_to_dict`` output)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
