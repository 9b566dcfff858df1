"""Typed settings from YAML mappings: a frozen dataclass per section, every field declared with `setting`
(default, range, choices), parsed by `parse_section` with one-line errors that name the key path and what was
expected. depthtune.config builds params.yaml on it; each variant kind (depthtune.methods) its own keys."""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import field

from depthtune.errors import ConfigError

# 3e-4, 1E+2, -2.5e-3: numbers in YAML 1.2, strings to PyYAML (its floats need a dot)
_EXPONENT_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def setting(default, lo=None, hi=None, lo_open=False, hi_open=False, choices=None, doc=""):
    """A config field: its default and the range / choices parse_section enforces (one-line errors)."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string",
            list: "a list", dict: "a mapping"}.get(tp, getattr(tp, "__name__", str(tp)))


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_range(path: str, value, meta) -> None:
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        op = ">" if meta.get("lo_open") else ">="
        raise ConfigError(f"{path}: {value} is out of range, expected {op} {lo}")
    if hi is not None and (value > hi or (meta.get("hi_open") and value == hi)):
        op = "<" if meta.get("hi_open") else "<="
        raise ConfigError(f"{path}: {value} is out of range, expected {op} {hi}")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(str, choices))}")


def _coerce(path: str, tp, value, meta):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(path, args[0], value, meta)
    if dataclasses.is_dataclass(tp):
        return parse_section(tp, value, path)
    if value is None:
        raise ConfigError(f"{path}: missing value, expected {_type_name(tp)}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: {value!r} is not true/false")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: {value!r} is not an integer")
    elif tp is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.match(value.strip()):
            value = float(value)  # PyYAML (YAML 1.1) reads `lr: 3e-4` as text; YAML 1.2 and DVC read a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: {value!r} is not a number")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: {value!r} is not a string")
    elif tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: {value!r} is not a list")
        value = tuple(value)
    elif tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {value!r} is not a mapping")
    if meta and not isinstance(value, (tuple, dict)):
        _check_range(path, value, meta)
    return value


def parse_section(cls, raw, path: str, extra_keys=()):
    """Build dataclass `cls` from a mapping; unknown keys, wrong types, bad ranges are errors. `extra_keys`: keys
    that are valid here but read elsewhere (a variant's kind key), named in the unknown-key message."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            valid = list(fields) + [k for k in extra_keys if k not in fields]
            raise ConfigError(f"{path}.{key}: unknown key{_suggest(str(key), valid)}; "
                              f"valid keys: {', '.join(valid)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        kwargs[name] = _coerce(f"{path}.{name}", hints[name], raw[name], dict(f.metadata))
    return cls(**kwargs)
