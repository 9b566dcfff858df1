"""Empty, migrated SQLite databases (Prefect's server, MLflow's store) kept once per machine for copying.

A fresh Prefect server spends ~15 s on ~150 schema migrations and a fresh MLflow store ~2.5 s on ~50
(2 cores); a new project copies the template instead.
"""
from __future__ import annotations

import os
import sqlite3
from importlib.metadata import version
from pathlib import Path

from depthtune.data.builtin_data import cache_root


def sqlite_copy(src: str | Path, dst: str | Path) -> None:
    """Consistent copy of a (possibly live) SQLite database through the backup API, written atomically."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    a, b = sqlite3.connect(str(src)), sqlite3.connect(str(tmp))
    try:
        a.backup(b)
    finally:
        b.close()
        a.close()
    os.replace(tmp, dst)


def database_template(package: str, filename: str) -> Path:
    """Where an empty, migrated database of `package` (at its installed version) is kept for copying:
    `$DEPTHTUNE_CACHE` or ~/.cache/depthtune, then <package>-db/<version>/<filename>."""
    return cache_root() / f"{package}-db" / version(package) / filename
