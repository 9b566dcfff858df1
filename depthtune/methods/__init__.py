"""Variant kinds: one module each, registered by name (depthtune.methods.base.Method says what a kind owns).

full (no key), top (`train_top: t`), probe (`train_top: 0`), layers (`train_layers: [i, j]`), lora (`lora: {...}`),
bitfit (`bitfit: true`), scratch (`init: scratch`). Adding a kind is one new module here that subclasses Method and calls `register`, plus
its test: `load()` imports every module of this folder, so nothing else lists the kinds. depthtune.config asks the
registry which kind a variant's params choose; the builder, the audit, the planner, step-time, the prefix cache and
the report ask the kind, never the params' fields.
"""
from __future__ import annotations

import importlib
import pkgutil

from depthtune.methods.base import HEAD_LR, REGISTRY, Method, Param, choose, get, keys, ordered

__all__ = ["HEAD_LR", "Method", "Param", "choose", "get", "keys", "load", "ordered"]


def load() -> dict[str, Method]:
    """Import every kind's module (each registers itself once); the registry by name."""
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    return REGISTRY


load()  # the registry is complete once depthtune.methods is imported (as peft's tuners register on import)
