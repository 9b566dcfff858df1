"""Atomic outputs and the stage entry-point wrapper.

A stage writes each output to a temporary sibling and renames it into place, so
a killed process never leaves a truncated file that a later run takes as valid,
and a failed stage leaves the previous outputs intact.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

from depthtune.errors import DepthtuneError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DepthtuneError(f"{path}: not found (run the stage that writes it first)") from None
    except ValueError as exc:
        raise DepthtuneError(f"{path}: not valid JSON ({exc})") from None


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a fresh temporary directory; on success it replaces `path` whole.

    On any error the temporary directory is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run_main(fn: Callable[[], Any]) -> None:
    """Run a stage's main(): user errors print one line and exit 2, no traceback."""
    try:
        fn()
    except DepthtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:
        # disk full, permission denied: name the file, keep it to one line
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"error:{where} {exc.strerror or exc}", file=sys.stderr)
        sys.exit(2)
