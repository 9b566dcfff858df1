"""One long-lived local Prefect server for the whole pipeline, started on demand.

Without PREFECT_API_URL every process starts Prefect's temporary server (8-20 s
each, shared/STACK.md): 14 stage processes would spend minutes on start-up.
`ensure_server()` instead starts `prefect server start --host 127.0.0.1` once,
records its URL in .prefect/server.json, and every later stage reuses it. A
keeper process stops the server after `DEPTHTUNE_PREFECT_IDLE_S` (default 900 s)
without a stage touching .prefect/last_used.

    python -m flows.server start | status | stop | prepare-db
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from depthtune.tracking.db_templates import database_template, sqlite_copy
from depthtune.layout import PROJECT_ROOT

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


def _database(env: dict) -> Path | None:
    """The server's SQLite file, unless the user points Prefect at another database."""
    if env.get("PREFECT_API_DATABASE_CONNECTION_URL") or env.get("PREFECT_SERVER_DATABASE_CONNECTION_URL"):
        return None
    return Path(env["PREFECT_HOME"]) / "prefect.db"


def template_database() -> Path:
    """An empty, fully migrated Prefect database for this Prefect version, shared by the user's projects.

    A fresh server spends ~15 s of its ~21 s start-up on ~150 schema migrations (2 cores);
    a clean clone copies this file instead and starts in ~6 s. Made by `make setup`
    (`python -m flows.server prepare-db`) or saved after the first migration on this machine.
    """
    return database_template("prefect", "prefect.db")


MEMO = "memo_store.toml"  # Prefect's record that the block types are registered (skips ~2.5 s at start-up)


def _copy_home(src_db: Path, dst_db: Path) -> None:
    """Copy a server home's database (consistently, even while live) and Prefect's memo store."""
    if (src_db.parent / MEMO).is_file():
        dst_db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src_db.parent / MEMO, dst_db.parent / MEMO)
    sqlite_copy(src_db, dst_db)  # last: the database's presence marks a complete copy


def seed_database(env: dict) -> bool:
    """Give a new server home the migrated template (if any); True when copied."""
    db, template = _database(env), template_database()
    if db is None or db.exists() or not template.is_file():
        return False
    try:
        _copy_home(template, db)
        return True
    except Exception:  # noqa: BLE001  (the server then migrates the database itself)
        db.unlink(missing_ok=True)
        return False


def save_template(env: dict) -> None:
    db, template = _database(env), template_database()
    if db is None or template.exists() or not db.is_file():
        return
    try:
        _copy_home(db, template)
    except Exception:  # noqa: BLE001  (an optimisation only)
        pass


def prepare_database() -> Path:
    """Create the migrated template now (a one-time step of `make setup`)."""
    template = template_database()
    if template.is_file():
        return template
    import tempfile

    with tempfile.TemporaryDirectory() as home:  # one real start: migrations and the start-up registrations
        env = dict(_env(), PREFECT_HOME=home)
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 180
            while not healthy(f"http://127.0.0.1:{port}/api"):
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError("prefect server did not start; run `prefect server start` to see why")
                time.sleep(0.5)
            _copy_home(Path(home) / "prefect.db", template)
        finally:
            server.terminate()
            server.wait(30)
    return template


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
        env = _env()
        Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
        seed_database(env)
        keeper = subprocess.Popen([sys.executable, "-m", "flows.server", "_keep", str(port)], cwd=PROJECT_ROOT,
                                  env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if healthy(url):
                STATE.write_text(json.dumps({"url": url, "keeper_pid": keeper.pid}))
                save_template(env)  # migrated, still empty: the next clean clone starts from it
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
    elif cmd == "prepare-db":  # one-time setup: migrated Prefect and MLflow databases to copy from
        from depthtune import runtime
        from depthtune.tracking.store import prepare_store_template

        runtime.configure_process()  # offline, telemetry off
        print(prepare_database())
        print(prepare_store_template())
    elif cmd == "stop":
        print("stopped" if stop_server() else "no server recorded")
    else:
        print(running_url() or "not running")
