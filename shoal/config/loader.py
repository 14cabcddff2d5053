"""Typed configs from YAML and dotted overrides.

A recipe is a tree of dataclasses. `from_dict` builds it from parsed YAML, refusing unknown keys
(with the dotted path of the offending key) and values of the wrong type; `apply_overrides` takes
`train.lr=3e-4` style strings and sets them with YAML's value parsing, so `true`, `1e-4`, `null`
and `[a, b]` mean what they look like.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from shoal.errors import ShoalError

T = TypeVar("T")

_DECIMAL = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Coerce `value` to `annotation` where it is lossless (int -> float), refuse it otherwise."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, where)
            except ShoalError as err:
                errors.append(str(err))
        raise ShoalError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(annotation):
            raise ShoalError(f"{where}: {value!r} is not one of {list(typing.get_args(annotation))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):  # a comma-separated override such as target_modules=q_proj,v_proj
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ShoalError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        items = [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return list(items) if origin is list else tuple(items)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ShoalError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ShoalError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, where)
    if annotation is Any:
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str) and _DECIMAL.match(value.strip()):
        return float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string; users mean the number
    if annotation is bool and not isinstance(value, bool):
        raise ShoalError(f"{where}: expected true or false, got {value!r}")
    if annotation in (int, float) and isinstance(value, bool):
        raise ShoalError(f"{where}: expected a number, got {value!r}")
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ShoalError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys raise with their dotted path."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        path = f"{where}." if where else ""
        raise ShoalError(f"unknown config key {path}{unknown[0]}; valid keys here: {', '.join(sorted(fields))}")
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ShoalError:
        raise
    except (TypeError, ValueError) as err:
        raise ShoalError(f"{where or cls.__name__}: {err}") from None


def to_dict(obj: Any) -> Any:
    """A plain, YAML-serialisable copy of a config tree."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.repr}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ShoalError(f"recipe file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ShoalError(f"recipe file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ShoalError(f"recipe file {path}: expected a mapping at the top level")
    return data


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """tree['a']['b'] = value for key 'a.b', creating intermediate mappings."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ShoalError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (YAML-parsed values) to a parsed recipe."""
    for item in overrides:
        key, sep, raw = item.lstrip("-").partition("=")
        if not sep or not key:
            raise ShoalError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        set_dotted(tree, key, value)
    return tree
