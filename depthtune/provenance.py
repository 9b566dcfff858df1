"""What produced a result: package versions, git commit, file fingerprints."""
from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "datasets", "evaluate", "mlflow", "prefect", "dvc")


@lru_cache(maxsize=1)
def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    try:
        out["depthtune"] = importlib.metadata.version("depthtune")
    except importlib.metadata.PackageNotFoundError:
        out["depthtune"] = None
    return out


def git_sha(cwd: str | Path = ".") -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_fingerprint(path: str | Path) -> str | None:
    """sha256 over every file's relative path and content in a folder (or one file)."""
    path = Path(path)
    if not path.exists():
        return None
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def provenance(cwd: str | Path = ".") -> dict:
    return {"versions": versions(), "git_sha": git_sha(cwd)}
