"""Servers the project starts listen on 127.0.0.1 only.

- flows/server.py (the project-local Prefect server every stage shares): started for real in a copy
  of the project, every listening socket of its process tree checked with psutil, then stopped.
- MLflow: the project starts no server (the store is a SQLite file); the README's `mlflow ui` and
  `mlflow server` default to 127.0.0.1. `python -m flows.retrain serve` talks to a Prefect server
  the user starts (`prefect server start --host 127.0.0.1`, README); its runner webserver is off.
Secrets: tests/tracking/test_tracking.py::test_secret_detection / test_log_variant_training_and_evaluation,
and tests/reliability/test_fault_pipeline.py::test_no_token_from_the_environment_reaches_the_tracking_store.
"""
from __future__ import annotations

import json
import re
import socket
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, make_project, project_env
from tests.reliability._util import run

pytestmark = pytest.mark.timeout(300)


def listening(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, ip, port) of every listening TCP socket of these processes."""
    out = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out += [(pid, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def other_ipv4() -> str | None:
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def test_project_prefect_server_listens_on_loopback_only(tmp_path):
    proj = make_project(tmp_path / "proj", {"variants": {"full": {}}}, git=False)
    env = project_env(proj, DEPTHTUNE_PREFECT_IDLE_S=120)  # stops itself even if this test dies
    started = run([sys.executable, "-m", "flows.server", "start"], proj, env, timeout=240)
    assert started.returncode == 0, started.stderr[-3000:]
    url = started.stdout.strip().splitlines()[-1]
    state = json.loads((proj / ".prefect/server.json").read_text())
    keeper = psutil.Process(state["keeper_pid"])
    tree = [keeper.pid] + [c.pid for c in keeper.children(recursive=True)]
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/api", url) and state["url"] == url
        socks = listening(tree)
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert any(p == port for _, _, p in socks), socks  # we are looking at the right processes
        assert socks and all(ip == "127.0.0.1" for _, ip, _ in socks), socks
        ip = other_ipv4()
        if ip is not None:  # not reachable from another interface of this machine
            with socket.socket() as s:
                s.settimeout(2)
                assert s.connect_ex((ip, port)) != 0
        status = run([sys.executable, "-m", "flows.server", "status"], proj, env, timeout=60)
        assert status.stdout.strip() == url
    finally:
        stopped = run([sys.executable, "-m", "flows.server", "stop"], proj, env, timeout=60)
    assert stopped.stdout.strip() == "stopped"
    deadline = time.time() + 40
    while time.time() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                                         for p in tree):
        time.sleep(0.5)
    alive = [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"server processes still running after stop: {alive}"
    status = run([sys.executable, "-m", "flows.server", "status"], proj, env, timeout=60)
    assert status.stdout.strip() == "not running"


def test_other_servers_default_to_loopback():
    import click
    from mlflow.cli import cli
    from prefect.settings import get_current_settings

    for name in ("ui", "server"):  # README: `mlflow ui --backend-store-uri sqlite:///...`
        cmd = cli.get_command(click.Context(cli), name)
        assert {p.name: p.default for p in cmd.params}["host"] == "127.0.0.1", name
    settings = get_current_settings()
    assert settings.server.api.host == "127.0.0.1"  # `prefect server start` without --host
    assert settings.runner.server.enable is False  # flows.retrain serve: no runner webserver


def test_no_production_code_binds_all_interfaces():
    """No 0.0.0.0 / '' bind or --host 0.0.0.0 anywhere in the code the pipeline runs."""
    offenders = []
    for folder in ("depthtune", "stages", "flows"):
        for f in (ROOT / folder).rglob("*.py"):
            text = f.read_text()
            if re.search(r"0\.0\.0\.0|bind\(\(\s*['\"]['\"]|host\s*=\s*['\"]::['\"]", text):
                offenders.append(str(f.relative_to(ROOT)))
    assert offenders == []
    assert "--host\", \"127.0.0.1\"" in (ROOT / "flows/server.py").read_text()
