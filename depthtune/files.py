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
import uuid
from pathlib import Path
from typing import Any, Callable

from depthtune.errors import DepthtuneError, first_line

def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def _remove_stale_temps(path: Path) -> None:
    """Remove the temp/old siblings of `path` that a killed writer left (`.<name>.<kind>-<pid>-...`,
    pid no longer alive). They are never read, but each holds a full copy of an output."""
    with contextlib.suppress(OSError):
        for sib in path.parent.iterdir():
            for kind in ("tmp", "old", "wtmp"):
                prefix = f".{path.name}.{kind}-"
                if sib.name.startswith(prefix):
                    pid = sib.name[len(prefix):].split("-", 1)[0]
                    if pid.isdigit() and not _pid_alive(int(pid)):
                        if sib.is_dir() and not sib.is_symlink():
                            shutil.rmtree(sib, ignore_errors=True)
                        else:
                            with contextlib.suppress(OSError):
                                sib.unlink()


def _check_writable_location(path: Path, want_dir: bool) -> None:
    """A file where a directory belongs (or the reverse) is refused before anything is written."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DepthtuneError(f"{path}: cannot write: {parent} is a file, expected a directory")
            break
    if want_dir and path.exists() and not path.is_dir():
        raise DepthtuneError(f"{path}: is a file, expected the output directory; move it away or choose another path")
    if not want_dir and path.is_dir():
        raise DepthtuneError(f"{path}: is a directory, expected the output file; move it away or choose another path")


def _is_write_failure(exc: BaseException) -> bool:
    """OSError (disk full, permission, quota) or safetensors' I/O error while writing an output."""
    if isinstance(exc, OSError):
        return True
    return type(exc).__name__ == "SafetensorError"


def write_failure(path: Path, exc: BaseException, what: str = "output") -> DepthtuneError:
    """One line naming the output and the reason; the caller guarantees the previous output is unchanged."""
    if isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror + (f": {exc.filename}" if exc.filename and str(exc.filename) != str(path) else "")
    else:
        reason = first_line(exc)
    return DepthtuneError(f"{path}: cannot write the {what} ({reason}); the previous {what} is unchanged")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary sibling, fsync it, rename it over `path`.

    The temporary file is created with os.open(..., 0o666) so the kernel applies the
    process umask: the file gets the usual mode (0644 under umask 022), not mkstemp's 0600.
    """
    path = Path(path)
    _check_writable_location(path, want_dir=False)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        # the pid lets a later run remove what a killed writer left (_remove_stale_temps)
        name = path.parent / f".{path.name}.wtmp-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        tmp = name  # ours from here on: removed on any failure below
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if _is_write_failure(exc):
            raise write_failure(path, exc, "file") from None
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


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
    _check_writable_location(path, want_dir=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # the pid lets a later run remove what a killed one left
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        tmp.mkdir()
    except OSError as exc:
        raise write_failure(path, exc) from None
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{tag}"
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)  # put the previous output back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(path.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_write_failure(exc) and not isinstance(exc, DepthtuneError):
            raise write_failure(path, exc) from None
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
        where = f" {exc.filename}:" if getattr(exc, "filename", None) else ""
        print(f"error:{where} {exc.strerror or exc}", file=sys.stderr)
        sys.exit(2)
