"""Helpers shared by the reliability tests: run a stage, check the one-line error contract, snapshot outputs."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
INJECT = HERE / "inject.py"  # SIGKILL in the middle of writing one file (see its docstring)

# Fields that measure time, memory or where/when a result was made: excluded when two runs are compared.
VOLATILE = {"wall_time_s", "train_time_s", "samples_per_s", "tokens_per_s", "peak_memory_bytes", "memory_ratio",
            "peak_reserved_bytes", "time_prediction", "latency_ms", "throughput_per_s", "versions", "git_sha",
            "mlflow_run_id", "tracking", "resumed_from_step", "latency_p50_ms", "latency_p95_ms"}


def run(cmd: list, cwd: Path, env: dict | None = None, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


def stage(module: str, *args, cwd: Path, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """`python -m stages.<module> args...` (the stage entry point, without Prefect or DVC)."""
    return run([sys.executable, "-m", f"stages.{module}", *args], cwd, env, **kw)


def injected(fault: str, module: str, *args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return run([sys.executable, INJECT, fault, "--", module, *args], cwd, env)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one non-empty stderr line `error: ...` containing every needle, no traceback."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(*roots: Path) -> dict:
    """{relative path: sha256} of every file under the given files/folders (missing ones map to None)."""
    out = {}
    for root in roots:
        if not root.exists():
            out[str(root)] = None
        elif root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
        else:
            for f in sorted(p for p in root.rglob("*") if p.is_file()):
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def leftovers(folder: Path, name: str) -> list[str]:
    """Temp/old siblings that a writer of `folder/name` leaves while (or when killed while) writing."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((f".{name}.tmp-", f".{name}.old-",
                                                                            f".{name}.wtmp-")))


def lock_outs(project: Path) -> dict:
    """{(stage, out path): md5} from a project's dvc.lock."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {(name, o["path"]): o.get("md5") for name, st in lock["stages"].items() for o in st.get("outs", [])}


def stable(obj):
    """A result JSON without the timing/provenance fields (recursively)."""
    if isinstance(obj, dict):
        return {k: stable(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [stable(v) for v in obj]
    return obj


def env_without(env: dict, *keys: str) -> dict:
    return {k: v for k, v in env.items() if k not in keys}


def rlimit_fsize(limit: int):
    """preexec_fn: the child may not write a file larger than `limit` bytes (a full disk; root ignores chmod).
    Python ignores SIGXFSZ, so the write fails with EFBIG instead of killing the process."""
    def apply():
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
