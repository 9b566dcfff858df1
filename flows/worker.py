"""A warm stage worker: the imports every stage process pays, paid once per pipeline run.

Each DVC stage is its own process, and each one spends ~6 s importing torch,
transformers and datasets, ~2 s importing Prefect and ~3 s importing MLflow before
doing any work (measured on 2 cores: 14 stage processes, ~2.5 minutes in all).
The first stage starts this worker in the background; it imports everything once
and then waits on a Unix socket. Each later `python -m flows.stage ...` (the
command DVC runs) connects, hands over its argv, working directory, environment
and stdin/stdout/stderr, and the worker forks a child that runs the stage exactly
as the stage process would have: same code path, own process, own exit code, its
output on DVC's terminal. The command DVC started waits for the child and exits
with its code; Ctrl-C and SIGTERM are forwarded, and a child whose caller died
kills itself.

When anything could differ from a fresh process, the stage runs in its own process
as before: no worker yet, a project source file changed since the worker started
(it exits), another Python or environment (each gets its own socket), torchrun
(DDP ranks), DEPTHTUNE_WORKER=0, or a worker that could not fork safely (a Python
thread running after the imports). Only the same user can connect (socket in a 0700
directory, peer uid checked). The worker exits after DEPTHTUNE_WORKER_IDLE_S
(default 300) seconds without a request.

    python -m flows.worker status | stop      # this project's worker
"""
from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("depthtune", "stages", "flows")
# Environment that changes what an import does (read once at import time): a worker only serves
# callers whose values match its own. Everything else is handed to the child as the caller's.
ENV_PREFIXES = ("HF_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "OMP_", "MKL_", "CUDA_", "TOKENIZERS_",
                "MLFLOW_", "PREFECT_", "DEPTHTUNE_", "PYTHON", "LD_", "DO_NOT_TRACK", "VIRTUAL_ENV")
ENV_VOLATILE = {"PREFECT_API_URL", "DEPTHTUNE_PIPELINE_KEY", "DEPTHTUNE_FAULT_KILL_AT_STEP",
                "DEPTHTUNE_WORKER_IDLE_S"}


def code_fingerprint(root: Path = ROOT) -> str:
    """Paths, sizes and mtimes of the project's Python sources (~50 stat calls)."""
    h = hashlib.sha256()
    for d in SOURCE_DIRS:
        for p in sorted((root / d).rglob("*.py")):
            st = p.stat()
            h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def env_key(env: dict) -> str:
    keep = sorted((k, v) for k, v in env.items()
                  if k.startswith(ENV_PREFIXES) and k not in ENV_VOLATILE)
    return json.dumps([sys.executable, str(ROOT), keep])


def socket_dir() -> Path:
    return Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / f"depthtune-{os.getuid()}"


def socket_path(env: dict) -> Path:
    """One socket per (project, interpreter, import-relevant environment), in a private directory."""
    base = socket_dir()
    base.mkdir(mode=0o700, exist_ok=True)
    if base.stat().st_uid != os.getuid() or base.stat().st_mode & 0o077:
        raise OSError(f"{base}: not a private directory of this user")
    return base / (hashlib.sha256(env_key(env).encode()).hexdigest()[:20] + ".sock")


def enabled() -> bool:
    return (os.environ.get("DEPTHTUNE_WORKER", "1") != "0" and "LOCAL_RANK" not in os.environ
            and "WORLD_SIZE" not in os.environ)


# ----------------------------------------------------------------------------- the caller's side


def _send(sock: socket.socket, obj: dict, fds: list[int] = ()) -> None:
    data = json.dumps(obj).encode()
    msg = struct.pack("!I", len(data)) + data
    if fds:
        socket.send_fds(sock, [msg], list(fds))
    else:
        sock.sendall(msg)


def _recv(sock: socket.socket, with_fds: int = 0):
    head, fds, _, _ = socket.recv_fds(sock, 4, with_fds) if with_fds else (sock.recv(4), [], 0, None)
    if len(head) < 4:
        return None, fds
    n = struct.unpack("!I", head)[0]
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None, fds
        buf += chunk
    return json.loads(buf), fds


def run_in_worker(stage_argv: list[str]) -> int | None:
    """Run `flows.stage <stage_argv>` in the warm worker; its exit code, or None to run it here."""
    if not enabled():
        return None
    env = dict(os.environ)
    try:
        path = socket_path(env)
    except OSError:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        _PENDING.append((env, path))  # started by start_pending(), once this stage's Prefect server is up
        return None
    try:
        _send(sock, {"argv": stage_argv, "cwd": os.getcwd(), "env": env, "code": code_fingerprint()},
              [0, 1, 2])
        reply, _ = _recv(sock)
        if not reply or "pid" not in reply:  # stale worker (it exits) or it refused: run here
            if reply and reply.get("restart"):
                _PENDING.append((env, path))
            return None
        child = reply["pid"]

        def forward(signum, _frame):
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, forward)
        while True:
            try:
                reply, _ = _recv(sock)
                break
            except InterruptedError:
                continue
        if not reply or "exit" not in reply:
            print("error: the stage worker stopped before the stage finished", file=sys.stderr)
            return 1
        return int(reply["exit"])
    finally:
        sock.close()


_PENDING: list = []


def start_pending() -> None:
    """Start the worker this process found missing. Called after the Prefect server is up: on 2
    cores the server's start-up (~6 s) and the worker's imports (~15 s) would slow each other."""
    while _PENDING:
        start_worker(*_PENDING.pop())


def _connectable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
            return True
        except OSError:
            return False


def start_worker(env: dict, path: Path) -> None:
    """Start the worker in the background (detached); this stage runs in its own process meanwhile."""
    import subprocess

    if _connectable(path):  # one became ready since this stage looked
        return
    lock = Path(str(path) + ".starting")
    try:
        if lock.exists() and time.time() - lock.stat().st_mtime < 120:
            return  # another stage is starting it
        lock.write_text(str(os.getpid()))
    except OSError:
        return
    log_dir = ROOT / ".depthtune"
    log_dir.mkdir(exist_ok=True)
    with open(log_dir / "worker.log", "ab") as log:
        subprocess.Popen([sys.executable, "-m", "flows.worker", "_serve", str(path)], cwd=ROOT, env=env,
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)


# ----------------------------------------------------------------------------- the worker


def preload() -> None:
    """Everything a stage imports, once. Nothing runs: no thread, no CUDA, no open store."""
    from depthtune import runtime  # noqa: F401  (offline defaults first)
    import importlib

    for name in ("stages.prepare", "stages.tokenization", "stages.audit", "stages.finetune", "stages.evaluation",
                 "stages.compare", "stages.promote", "flows.stage", "flows.server", "depthtune.tracking",
                 "depthtune.serving", "depthtune.registry", "depthtune.report", "mlflow",
                 "mlflow.store.tracking.sqlalchemy_store", "mlflow.pyfunc", "prefect", "prefect.flow_engine",
                 "prefect.task_engine", "prefect.client.orchestration", "prefect.states",
                 "transformers.models.bert.modeling_bert", "peft", "matplotlib.pyplot"):
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001  (a missing optional module only costs its import later)
            print(f"worker: preload {name}: {exc}", file=sys.stderr)
    try:  # a process's first SQLite store pays for SQLAlchemy's dialect set-up (~0.4 s): pay it here
        import tempfile

        from mlflow import MlflowClient

        from depthtune.tracking import _seed_store

        with tempfile.TemporaryDirectory() as tmp:
            _seed_store(f"{tmp}/warm.db")
            MlflowClient(tracking_uri=f"sqlite:///{tmp}/warm.db").search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001
        print(f"worker: preload mlflow store: {exc}", file=sys.stderr)
    try:  # MLflow maps every installed module to its distribution (~1.3 s) when a model is logged
        from mlflow.utils.requirements_utils import _init_packages_to_modules_map
        _init_packages_to_modules_map()
    except Exception as exc:  # noqa: BLE001  (private API: if it moved, the child pays the 1.3 s)
        print(f"worker: preload mlflow requirements map: {exc}", file=sys.stderr)


def threads_running() -> int:
    """Python threads besides this one. Native helpers (torch's, pyarrow's jemalloc thread) are
    fork-safe through their own atfork handlers, as with DataLoader workers and datasets.map."""
    import threading
    return threading.active_count()


def serve(path: Path) -> None:
    t0 = time.time()
    code = code_fingerprint()
    preload()
    if code_fingerprint() != code:
        print("worker: sources changed while loading; exiting", file=sys.stderr)
        return
    n = threads_running()
    if n != 1:  # fork() with another thread alive can deadlock the child: refuse to serve
        print(f"worker: {n} threads after the imports, forking would be unsafe; exiting", file=sys.stderr)
        return
    idle_s = float(os.environ.get("DEPTHTUNE_WORKER_IDLE_S", "300"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `flows.worker stop`: clean up the socket
    if _connectable(path):  # two stages raced to start a worker: the first one ready keeps the socket
        print("worker: another worker already serves this socket; exiting", file=sys.stderr)
        return
    path.unlink(missing_ok=True)  # a dead worker's socket file
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    os.chmod(path, 0o600)
    inode = path.stat().st_ino
    srv.listen(16)
    Path(str(path) + ".starting").unlink(missing_ok=True)
    info = Path(str(path) + ".json")
    info.write_text(json.dumps({"pid": os.getpid(), "root": str(ROOT), "ready_s": round(time.time() - t0, 1)}))
    print(f"worker {os.getpid()}: ready in {time.time() - t0:.1f} s at {path}", file=sys.stderr, flush=True)
    children: dict[int, socket.socket] = {}
    last = time.time()
    try:
        while True:
            ready, _, _ = select.select([srv], [], [], 0.05)  # also how soon a finished child is reported
            if ready:
                conn, _ = srv.accept()
                last = time.time()
                pid = _handle(conn, code, srv, path)
                if pid == -1:
                    return  # stale: let the next stage start a fresh worker
                if pid:
                    children[pid] = conn
                else:
                    conn.close()
            while children:  # reap finished children, tell their callers the exit code
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                conn = children.pop(pid, None)
                if conn is not None:
                    try:
                        _send(conn, {"exit": os.waitstatus_to_exitcode(status) if not os.WIFSIGNALED(status)
                                     else 128 + os.WTERMSIG(status)})
                    except OSError:
                        pass
                    conn.close()
                last = time.time()
            if not children and time.time() - last > idle_s:
                return
    finally:
        srv.close()
        try:  # only our own socket: a newer worker may have replaced it
            if path.stat().st_ino == inode:
                path.unlink()
                info.unlink(missing_ok=True)
        except OSError:
            pass


def _handle(conn: socket.socket, code: str, srv: socket.socket, path: Path) -> int:
    """Fork a child for one request: its pid, 0 if refused, -1 if this worker is stale."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    if uid != os.getuid():
        return 0
    conn.settimeout(10)
    try:
        req, fds = _recv(conn, with_fds=3)
    except (OSError, ValueError):
        return 0
    if not req or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        return 0
    if req.get("code") != code:  # the caller fingerprinted the same files just now
        _send(conn, {"stale": True, "restart": True})
        for fd in fds:
            os.close(fd)
        return -1
    conn.settimeout(None)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: become the stage process the caller would have been
        srv.close()
        try:
            _child(conn, req, fds)
        finally:
            os._exit(70)
    for fd in fds:
        os.close(fd)
    _send(conn, {"pid": pid})
    return pid


def _child(conn: socket.socket, req: dict, fds: list[int]) -> None:
    import threading

    os.setsid()  # own process group: the caller forwards signals by pid
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(req["cwd"])
    for stream in (sys.stdout, sys.stderr):  # the caller's terminal or DVC's pipe: show progress as it comes
        stream.reconfigure(line_buffering=True)
    os.environ.clear()
    os.environ.update(req["env"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def watch_caller():  # the command DVC started died (killed): do not outlive it
        try:
            while conn.recv(1):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch_caller, daemon=True).start()
    sys.argv = ["flows.stage", *req["argv"]]
    exit_code = 0
    try:
        from flows import stage

        stage.main_in_process(req["argv"], forked=True)
    except SystemExit as exc:
        exit_code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001  (what an uncaught exception does to a process)
        import traceback
        traceback.print_exc()
        exit_code = 1
    finally:
        import atexit
        atexit._run_exitfuncs()  # Prefect flushes its logs and events here, as at a normal exit
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(exit_code)


# ----------------------------------------------------------------------------- status / stop


def _workers() -> list[tuple[Path, dict]]:
    base = socket_dir()
    out = []
    for info in sorted(base.glob("*.sock.json")):
        try:
            data = json.loads(info.read_text())
        except (OSError, ValueError):
            continue
        if data.get("root") == str(ROOT):
            out.append((Path(str(info)[:-5]), data))
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else "status"
    if cmd == "_serve":
        serve(Path(argv[1]))
        return 0
    workers = _workers()
    if cmd == "status":
        for path, data in workers:
            print(f"worker pid {data['pid']} at {path} (ready in {data.get('ready_s')} s)")
        if not workers:
            print("no worker running for this project")
        return 0
    if cmd == "stop":
        for path, data in workers:
            try:
                os.kill(data["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass
            path.unlink(missing_ok=True)
            Path(str(path) + ".json").unlink(missing_ok=True)
        print(f"stopped {len(workers)} worker(s)")
        return 0
    print("usage: python -m flows.worker status|stop", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
