"""Tasks: what the variants are trained to do, one module each (depthtune.tasks.base.Task says what a task owns):
classification and causal_lm. `load()` imports every module of this folder, each registering its task."""
from __future__ import annotations

import importlib
import pkgutil

from depthtune.tasks.base import REGISTRY, Task, get

__all__ = ["Task", "every", "get", "load", "names"]


def load() -> dict[str, Task]:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    return REGISTRY


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def every() -> list[Task]:
    """The registered tasks (load() ran when the package was imported: no folder scan here)."""
    return list(REGISTRY.values())


load()  # the registry is complete once depthtune.tasks is imported
