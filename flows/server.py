"""One long-lived local Prefect server for the whole pipeline, started on demand.

Without PREFECT_API_URL every process starts Prefect's temporary server (8-20 s
each, shared/STACK.md): 14 stage processes would spend minutes on start-up.
`ensure_server()` instead starts `prefect server start --host 127.0.0.1` once,
records its URL in .prefect/server.json, and every later stage reuses it. A
keeper process stops the server after `DEPTHTUNE_PREFECT_IDLE_S` (default 900 s)
without a stage touching .prefect/last_used.

    python -m flows.server start | status | stop
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from depthtune.files import PROJECT_ROOT

STATE_DIR = Path(os.environ.get("DEPTHTUNE_PREFECT_DIR", PROJECT_ROOT / ".prefect"))
STATE = STATE_DIR / "server.json"
LAST_USED = STATE_DIR / "last_used"


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("PREFECT_HOME", str(STATE_DIR / "home"))
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    env.pop("PREFECT_API_URL", None)
    return env


def running_url() -> str | None:
    try:
        state = json.loads(STATE.read_text())
    except (OSError, ValueError):
        return None
    return state["url"] if healthy(state["url"]) else None


def touch() -> None:
    """Mark the project server as in use (the keeper stops it after an idle period)."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    LAST_USED.touch()


def ensure_server(timeout: float = 90.0) -> str:
    """URL of a healthy project server, starting one (host 127.0.0.1) if needed."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    LAST_USED.touch()
    url = running_url()
    if url:
        return url
    lock = STATE_DIR / "start.lock"
    try:  # one starter at a time; others wait for its server.json
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.close(fd)
    except FileExistsError:
        if time.time() - lock.stat().st_mtime > timeout:
            lock.unlink(missing_ok=True)
            return ensure_server(timeout)
        deadline = time.time() + timeout
        while time.time() < deadline:
            time.sleep(1)
            url = running_url()
            if url:
                return url
        raise RuntimeError("timed out waiting for another process to start the Prefect server")
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}/api"
        log = open(STATE_DIR / "server.log", "ab")
        keeper = subprocess.Popen([sys.executable, "-m", "flows.server", "_keep", str(port)], cwd=PROJECT_ROOT,
                                  env=_env(), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if healthy(url):
                STATE.write_text(json.dumps({"url": url, "keeper_pid": keeper.pid}))
                return url
            if keeper.poll() is not None:
                raise RuntimeError(f"Prefect server failed to start, see {STATE_DIR / 'server.log'}")
            time.sleep(0.5)
        raise RuntimeError(f"Prefect server not healthy after {timeout:.0f} s, see {STATE_DIR / 'server.log'}")
    finally:
        lock.unlink(missing_ok=True)


def _keep(port: int) -> None:
    """Run the server; stop it once no stage has used it for the idle period."""
    idle = float(os.environ.get("DEPTHTUNE_PREFECT_IDLE_S", "900"))
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=_env())

    def stop(*_):
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    while server.poll() is None:
        time.sleep(5)
        try:
            if time.time() - LAST_USED.stat().st_mtime > idle:
                stop()
        except OSError:
            stop()


def stop_server() -> bool:
    try:
        state = json.loads(STATE.read_text())
    except (OSError, ValueError):
        return False
    try:
        os.kill(state["keeper_pid"], signal.SIGTERM)
    except ProcessLookupError:
        pass
    STATE.unlink(missing_ok=True)
    return True


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "status"
    if cmd == "_keep":
        _keep(int(sys.argv[2]))
    elif cmd == "start":
        print(ensure_server())
    elif cmd == "stop":
        print("stopped" if stop_server() else "no server recorded")
    else:
        print(running_url() or "not running")
