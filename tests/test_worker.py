"""flows/worker.py: stages forked from a warm worker behave like stage processes.

Real processes throughout: a copied project, the worker started by a first stage
call, stages run through it, compared with the same stages run in a fresh process.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import make_project, project_env, tiny_params


def stage(proj: Path, env: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.stage", *args], cwd=proj, env=env, capture_output=True,
                          text=True, timeout=timeout)


def timings(proj: Path) -> list[dict]:
    return [json.loads(line) for line in (proj / ".depthtune" / "timings.jsonl").read_text().splitlines()]


def worker_pid(proj: Path, env: dict, wait_s: float = 180) -> int:
    deadline = time.time() + wait_s
    while time.time() < deadline:
        out = subprocess.run([sys.executable, "-m", "flows.worker", "status"], cwd=proj, env=env,
                             capture_output=True, text=True).stdout
        if out.startswith("worker pid"):
            return int(out.split()[2])
        time.sleep(1)
    raise AssertionError(f"no worker became ready: {(proj / '.depthtune' / 'worker.log').read_text()[-2000:]}")


@pytest.fixture(scope="module")
def project(tmp_path_factory, shared_data):
    params = tiny_params(shared_data, variants={"probe": {"train_top": 0, "train": {"lr": 5e-3}},
                                                   "slow": {"train": {"epochs": 60}}},
                         tracking={"enabled": False})
    proj = make_project(tmp_path_factory.mktemp("worker") / "proj", params)
    env = project_env(proj, DEPTHTUNE_PREFECT=0, DEPTHTUNE_WORKER=1, DEPTHTUNE_WORKER_IDLE_S=120)
    for name in ("prepare", "tokenization", "audit"):  # the first call starts the worker in the background
        proc = stage(proj, env, name)
        assert proc.returncode == 0, proc.stderr[-2000:]
    worker_pid(proj, env)
    yield proj, env
    subprocess.run([sys.executable, "-m", "flows.worker", "stop"], cwd=proj, env=env, capture_output=True)


def test_a_forked_stage_trains_exactly_like_a_fresh_process(project):
    proj, env = project
    proc = stage(proj, env, "finetune", "--variant", "probe")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "finetune probe:" in proc.stdout + proc.stderr  # its output reached the caller's pipes
    assert timings(proj)[-1]["worker"] is True
    forked = json.loads((proj / "metrics" / "train" / "probe.json").read_text())

    proc = stage(proj, dict(env, DEPTHTUNE_WORKER="0"), "finetune", "--variant", "probe")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert timings(proj)[-1]["worker"] is False
    fresh = json.loads((proj / "metrics" / "train" / "probe.json").read_text())
    assert forked["loss_curve"] == fresh["loss_curve"] and forked["best_val"] == fresh["best_val"]


def test_errors_and_exit_codes_pass_through(project):
    proj, env = project
    proc = stage(proj, env, "evaluation", "--variant", "nosuch")
    assert proc.returncode == 2
    assert "error: --variant nosuch: not in params variants (probe, slow)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert timings(proj)[-1]["worker"] is True


def test_killing_the_caller_kills_the_forked_stage(project):
    proj, env = project
    pid = worker_pid(proj, env)
    caller = subprocess.Popen([sys.executable, "-m", "flows.stage", "finetune", "--variant", "slow"], cwd=proj,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    children = []
    while time.time() < deadline and not children:
        children = psutil.Process(pid).children()
        time.sleep(0.2)
    assert children, "the worker forked no child"
    caller.send_signal(signal.SIGKILL)
    caller.wait()
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"forked stage outlived its caller: {alive}"
    assert not (proj / "metrics" / "train" / "slow.json").exists()  # it was stopped, not finished


def test_a_changed_source_file_retires_the_worker(project):
    proj, env = project
    old = worker_pid(proj, env)
    src = proj / "depthtune" / "errors.py"
    src.write_text(src.read_text() + "\n# edited\n")
    proc = stage(proj, env, "prepare")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert timings(proj)[-1]["worker"] is False  # stale worker refused: the stage ran in its own process
    psutil.Process(old).wait(30)  # and the stale worker exited
    new = worker_pid(proj, env)  # a fresh one was started for the next stages
    assert new != old
    proc = stage(proj, env, "prepare")
    assert proc.returncode == 0 and timings(proj)[-1]["worker"] is True
