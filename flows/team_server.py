"""A team's tracking server on one machine: PostgreSQL + `mlflow server` with proxied artifacts.

    python -m flows.team_server start --dir ~/depthtune-team            # prints the tracking URI
    python -m flows.team_server start --dir DIR --host 10.0.0.5 --port 5000  # this host's LAN address: the team reaches it
    python -m flows.team_server status --dir DIR
    python -m flows.team_server stop --dir DIR

What it starts (all of it under DIR, nothing system-wide):
- a private PostgreSQL cluster (Debian's `postgresql` package: initdb + pg_ctl, run as the `postgres`
  user when started by root, since PostgreSQL refuses to run as root), listening on 127.0.0.1 only,
  password authentication (scram-sha-256) for the `depthtune` role; the password is generated once and
  kept in DIR/pgpass (mode 0600), handed to MLflow through PGPASSFILE, so it is in no URI, command line
  or log;
- `mlflow server --backend-store-uri postgresql://depthtune@127.0.0.1:PG/mlflow --artifacts-destination
  DIR/artifacts`: runs, the model registry and (proxied) artifacts, so workers need no shared disk.
  Projects point at it with `tracking.uri: http://HOST:PORT` in params.yaml.

The test fixture (tests/test_distributed.py) starts one in a temp directory; docs/scale-out.md
describes the same set-up on a team machine (a managed PostgreSQL works the same way: pass --backend).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from flows.server import free_port, healthy

PG_ROLE, PG_DB = "depthtune", "mlflow"


def pg_bin() -> Path:
    """The directory of initdb / pg_ctl: PATH, else Debian's /usr/lib/postgresql/<newest>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if versions:
        return Path(versions[-1]).parent
    raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (make setup does it as root)")


def as_pg_user(args: list[str]) -> list[str]:
    """PostgreSQL's server programs refuse root: run them as the `postgres` user then."""
    if os.geteuid() != 0:
        return args
    return ["runuser", "-u", "postgres", "--", *args]


def give_to_pg_user(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, user="postgres", group="postgres")


@dataclass
class TeamServer:
    dir: str
    pg_port: int
    mlflow_port: int
    host: str
    mlflow_pid: int

    @property
    def tracking_uri(self) -> str:
        import ipaddress

        try:
            wildcard = ipaddress.ip_address(self.host).is_unspecified  # bound to every interface
        except ValueError:  # a host name
            wildcard = False
        return f"http://{'127.0.0.1' if wildcard else self.host}:{self.mlflow_port}"

    @property
    def backend_uri(self) -> str:  # no password: it is in PGPASSFILE
        return f"postgresql://{PG_ROLE}@127.0.0.1:{self.pg_port}/{PG_DB}"


def state_file(root: Path) -> Path:
    return root / "team.json"


def pg_env(root: Path) -> dict:
    return {**os.environ, "PGPASSFILE": str(root / "pgpass"), "PGCONNECT_TIMEOUT": "10"}


def run_quiet(args: list[str], what: str, env: Optional[dict] = None) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(f"{what} failed: {detail[-1] if detail else 'exit code ' + str(proc.returncode)}")


def start_postgres(root: Path, port: int) -> None:
    """initdb (once) + pg_ctl start on 127.0.0.1:port; the database `mlflow` owned by `depthtune`."""
    bin_dir, data = pg_bin(), root / "pgdata"
    root.mkdir(parents=True, exist_ok=True)
    password_file = root / "pgpass"
    if not password_file.exists():
        password = secrets.token_urlsafe(24)
        password_file.write_text(f"127.0.0.1:*:*:{PG_ROLE}:{password}\n")
        password_file.chmod(0o600)
    password = password_file.read_text().strip().rsplit(":", 1)[1]
    sock = root / "pgsock"
    sock.mkdir(exist_ok=True)
    give_to_pg_user(sock)
    fresh = not (data / "PG_VERSION").exists()
    if fresh:
        data.mkdir(exist_ok=True)
        give_to_pg_user(data)
        pw_init = root / "pgpass.init"  # initdb reads the superuser password from a file; removed at once
        pw_init.write_text(password + "\n")
        pw_init.chmod(0o600)
        give_to_pg_user(pw_init)
        try:
            run_quiet(as_pg_user([str(bin_dir / "initdb"), "-D", str(data), "-U", PG_ROLE, "-E", "UTF8",
                                  "--locale=C", "--auth-local=scram-sha-256", "--auth-host=scram-sha-256",
                                  f"--pwfile={pw_init}"]), "initdb")
        finally:
            pw_init.unlink(missing_ok=True)
    log = root / "postgres.log"
    log.touch()
    give_to_pg_user(log)
    run_quiet(as_pg_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                          "-o", f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start"]), "pg_ctl start")
    if fresh:
        import psycopg2

        con = psycopg2.connect(host="127.0.0.1", port=port, user=PG_ROLE, password=password, dbname="postgres")
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute(f"CREATE DATABASE {PG_DB}")
        con.close()


def stop_postgres(root: Path) -> None:
    data = root / "pgdata"
    if (data / "postmaster.pid").exists():
        subprocess.run(as_pg_user([str(pg_bin() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True)


def start_mlflow(root: Path, backend_uri: str, host: str, port: int, timeout_s: float = 120.0) -> int:
    """`mlflow server` on the PostgreSQL store with proxied artifacts under root/artifacts; its pid."""
    artifacts = root / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    env = {**pg_env(root), "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    mlflow = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow) if mlflow.exists() else "mlflow", "server", "--host", host, "--port", str(port),
           "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts), "--workers", "1"]
    with open(root / "mlflow.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (root / "mlflow.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"mlflow server exited ({proc.returncode}): {tail[0] if tail else ''} "
                               f"(log: {root / 'mlflow.log'})")
        if healthy(url):
            return proc.pid
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    raise RuntimeError(f"mlflow server not healthy on {url} within {timeout_s:.0f} s (log: {root / 'mlflow.log'})")


def start(root: Path, *, host: str = "127.0.0.1", port: Optional[int] = None,
          pg_port: Optional[int] = None) -> TeamServer:
    """Start (or find running) the team server under `root`."""
    root = root.resolve()
    current = status(root)
    if current is not None:
        return current
    pg_port = pg_port or free_port()
    start_postgres(root, pg_port)
    server = TeamServer(str(root), pg_port, port or free_port(), host, 0)
    try:
        server.mlflow_pid = start_mlflow(root, server.backend_uri, host, server.mlflow_port)
    except BaseException:
        stop_postgres(root)
        raise
    state_file(root).write_text(json.dumps(asdict(server), indent=2) + "\n")
    return server


def status(root: Path) -> Optional[TeamServer]:
    """The running team server under `root`, else None."""
    try:
        server = TeamServer(**json.loads(state_file(root).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return server if healthy(server.tracking_uri) else None


def stop(root: Path) -> None:
    root = root.resolve()
    try:
        server = TeamServer(**json.loads(state_file(root).read_text()))
        os.killpg(server.mlflow_pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and healthy(server.tracking_uri, timeout=0.5):
            time.sleep(0.2)
    except (OSError, ValueError, TypeError):
        pass
    stop_postgres(root)
    state_file(root).unlink(missing_ok=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["start", "status", "stop"])
    ap.add_argument("--dir", required=True, type=Path, help="where the cluster, artifacts and logs live")
    ap.add_argument("--host", default="127.0.0.1", help="MLflow's address (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=None, help="MLflow's port (default: a free one)")
    ap.add_argument("--pg-port", type=int, default=None, help="PostgreSQL's port on 127.0.0.1 (default: a free one)")
    args = ap.parse_args(argv)
    if args.command == "start":
        s = start(args.dir, host=args.host, port=args.port, pg_port=args.pg_port)
        print(f"MLflow: {s.tracking_uri} (params.yaml: tracking.uri: {s.tracking_uri}); "
              f"store: {s.backend_uri}; artifacts: {Path(s.dir) / 'artifacts'} (proxied)")
    elif args.command == "status":
        s = status(args.dir.resolve())
        print(f"running: {s.tracking_uri}" if s else "not running")
    else:
        stop(args.dir)
        print("stopped")


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
