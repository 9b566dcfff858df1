"""Objects found by name: the variant kinds (depthtune.methods) and the tasks (depthtune.tasks) each keep one table
their modules register into once, and the rest of the package looks them up with a one-line error."""
from __future__ import annotations

from typing import Callable, Optional

from depthtune.errors import ConfigError


class Named(dict):
    """name -> object (each object has a `.name`); `what` names the concept in errors ("variant kind", "task")."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, obj):
        """Add `obj` under its name (once: a second object of the same name is a programming error)."""
        if not obj.name or obj.name in self:
            raise ValueError(f"{self.what} {obj.name!r}: empty or registered twice")
        self[obj.name] = obj
        return obj

    def find(self, name: str, order: Optional[Callable] = None):
        """The object named `name`, or a ConfigError listing the known names (sorted by `order`, a key on the
        objects, when given; the listing is built only on a miss)."""
        try:
            return self[name]
        except KeyError:
            known = ", ".join(o.name for o in (sorted(self.values(), key=order) if order else self.values()))
            raise ConfigError(f"{self.what} {name!r}: not one of {known}") from None
