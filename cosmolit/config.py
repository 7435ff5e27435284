"""Strict YAML configuration: dataclasses as schemas, unknown keys and wrong types refused.

Every preset in configs/ is a YAML mapping whose keys are the fields of one dataclass
(nested dataclasses for nested mappings). `load_config(path, Schema)` returns a filled
instance or raises UsageError with one line naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cosmolit.errors import UsageError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints accepted for floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UsageError as exc:
                errors.append(str(exc))
        raise UsageError(f"{where}: {value!r} is not one of {' | '.join(_type_name(a) for a in args)}")
    if origin is typing.Literal:
        if value not in args:
            raise UsageError(f"{where}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UsageError(f"{where}: expected a mapping of {_type_name(tp)} fields, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UsageError(f"{where}: expected a list of {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if (origin is tuple or tp is tuple) else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UsageError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UsageError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise UsageError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(schema: type[T], data: dict, where: str = "config") -> T:
    """Build `schema` (a dataclass) from a mapping, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise UsageError(
            f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(schema)
    kwargs = {name: _coerce(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    try:
        obj = schema(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{where}: {exc}") from None
    return obj


def to_dict(obj: Any) -> dict:
    """A dataclass as plain YAML-safe types (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(obj)


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with one clear line for a missing file or bad YAML."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"config file {str(path)!r} is not valid YAML{at}") from None
    except UnicodeDecodeError:
        raise UsageError(f"config file {str(path)!r} is not a text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, schema: type[T], overrides: dict | None = None) -> T:
    """Defaults of `schema`, updated by the YAML file at `path`, then by `overrides` (None values skipped)."""
    data = read_yaml(path) if path is not None else {}
    where = f"{Path(path).name}" if path is not None else "config"
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    return from_dict(schema, data, where)


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj) if dataclasses.is_dataclass(obj) else obj, sort_keys=False)


def accepted_kwargs(cls, values: dict) -> dict:
    """The entries of `values` that `cls(...)` accepts as keyword arguments (all of them if it takes **kwargs)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return values
    return {k: v for k, v in values.items() if k in params}
