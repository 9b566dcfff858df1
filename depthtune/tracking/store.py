"""The MLflow store: where it is, how to open it, and how to serialise processes on it.

The default store is a SQLite file, <project root>/mlflow.db, with artifacts under
<project root>/mlartifacts/<experiment>; params.yaml `tracking.uri` may point at a
server instead. A new SQLite store starts as a copy of an empty, already migrated
template (MLflow's ~50 schema migrations cost ~2.5 s on 2 cores), and its first use
is serialised by a lock file: several stage processes creating one database at once
race on the migrations (shared/STACK.md).

Imports neither depthtune.tracking.log_runs nor depthtune.serving (both use it); mlflow itself
is imported only when a store is opened.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Optional

from depthtune.config import TrackingConfig, load_params
from depthtune.tracking.db_templates import database_template, sqlite_copy
from depthtune.layout import PROJECT_ROOT

DEFAULT_DB = "mlflow.db"  # under the project root when tracking.uri is not set
DEFAULT_ARTIFACT_ROOT = "mlartifacts"  # likewise for tracking.artifact_root
SQLITE = "sqlite:///"

# ----------------------------------------------------------------------------- where the store is


def tracking_uri(cfg: TrackingConfig) -> str:
    """cfg.uri, or sqlite:///<project root>/mlflow.db; relative sqlite paths become absolute."""
    uri = cfg.uri or f"{SQLITE}{PROJECT_ROOT / DEFAULT_DB}"
    if uri.startswith(SQLITE):
        path = uri[len(SQLITE):]
        if path and not path.startswith("/") and path != ":memory:":
            uri = f"{SQLITE}{(PROJECT_ROOT / path).resolve()}"
    elif "://" not in uri and uri.endswith(".db"):  # a bare path: MLflow would use the deprecated file store
        uri = f"{SQLITE}{(PROJECT_ROOT / uri).resolve()}"
    return uri


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def artifact_location(cfg: TrackingConfig) -> Optional[str]:
    """Absolute `<artifact_root>/<experiment>` for local stores; a server picks its own unless told."""
    if cfg.artifact_root is None and is_remote(tracking_uri(cfg)):
        return None  # the server's --artifacts-destination (mlflow-artifacts:/) decides
    root = cfg.artifact_root or str(PROJECT_ROOT / DEFAULT_ARTIFACT_ROOT)
    if "://" in root:
        return f"{root.rstrip('/')}/{cfg.experiment}"
    return str((PROJECT_ROOT / root).resolve() / cfg.experiment)


def sqlite_path(uri: str) -> Optional[str]:
    """The database file of a sqlite:/// URI, else None."""
    return uri[len(SQLITE):] if uri.startswith(SQLITE) else None


def config_from_params(path: str | Path = "params.yaml") -> TrackingConfig:
    """The `tracking` section of params.yaml here (else the project's), else the defaults."""
    path = Path(path)
    if not path.is_file() and (PROJECT_ROOT / "params.yaml").is_file():
        path = PROJECT_ROOT / "params.yaml"
    return load_params(path).tracking if path.is_file() else TrackingConfig()


# ----------------------------------------------------------------------------- locks


def lock_path(uri: str, purpose: str) -> str:
    """A lock file next to a SQLite store, else in the temp dir keyed by the URI."""
    db = sqlite_path(uri)
    if db and db != ":memory:":
        return f"{db}.{purpose}.lock"
    h = hashlib.sha256(uri.encode()).hexdigest()[:12]
    return str(Path(tempfile.gettempdir()) / f"depthtune-{purpose}-{h}.lock")


@contextlib.contextmanager
def file_lock(path: Optional[str], timeout_s: float = 120.0):
    """Hold an exclusive lock on a file (POSIX flock) for the `with` body; no-op for path None or on Windows.

    Polls every 0.1 s and raises TimeoutError after `timeout_s`; the lock dies with the process.
    """
    if path is None:
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"could not lock {path} within {timeout_s:.0f} s") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


LOCK_HOLDER_TAG, LOCK_EXPIRES_TAG = "depthtune.lock.holder", "depthtune.lock.expires"


def lock_model_name(purpose: str) -> str:
    return f"{purpose}--lock"


def error_code(exc) -> str:
    return str(getattr(exc, "error_code", ""))


def take_lock(client, name: str, holder: str, timeout_s: float, lease_s: float) -> None:
    """Create the lock model `name` as `holder` (atomic in the store), breaking an expired lease on the way;
    TimeoutError after `timeout_s`."""
    from mlflow.exceptions import MlflowException

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(name, tags={LOCK_HOLDER_TAG: holder,
                                                       LOCK_EXPIRES_TAG: f"{time.time() + lease_s:.3f}"},
                                           description=f"depthtune {name}: held while a promotion runs")
            return
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" in error_code(exc):
                # lost the insert to a holder that released before the store could name it: the store
                # answers a unique-name violation by reading the existing model (mlflow's SqlAlchemyStore),
                # which is gone by then. Nothing was created; try again at once.
                continue
            if "RESOURCE_ALREADY_EXISTS" not in error_code(exc):
                raise
        try:
            held = client.get_registered_model(name)
            if float(held.tags.get(LOCK_EXPIRES_TAG, "0")) < time.time():  # its holder stopped renewing
                client.delete_registered_model(name)
                continue
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" not in error_code(exc):  # released meanwhile: try again at once
                raise
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"could not take the lock {name!r} in the tracking store within {timeout_s:.0f} s "
                               f"(held by {held.tags.get(LOCK_HOLDER_TAG, '?')})")
        time.sleep(0.2)


@contextlib.contextmanager
def renewing_lease(client, name: str, lease_s: float):
    """While the block runs, renew the lock's lease tag every lease_s / 3 seconds (a failed renewal only shortens
    the lease)."""
    import threading

    stop = threading.Event()

    def renew():
        while not stop.wait(lease_s / 3):
            with contextlib.suppress(Exception):
                client.set_registered_model_tag(name, LOCK_EXPIRES_TAG, f"{time.time() + lease_s:.3f}")

    renewer = threading.Thread(target=renew, daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()


@contextlib.contextmanager
def store_lock(client, purpose: str, timeout_s: float = 120.0, lease_s: float = 60.0):
    """Hold an exclusive lock kept in the tracking store's own database, for every machine that uses it.

    The lock is a registered model named `<purpose>--lock`: creating one is atomic in the store (a
    unique name; the second creator gets RESOURCE_ALREADY_EXISTS from the database, through any server, or
    RESOURCE_DOES_NOT_EXIST when the holder released between the two), and deleting it is the release.
    The holder renews a lease tag every lease_s / 3 seconds; a lock whose lease ran out (its holder died:
    SIGKILL, a lost machine) is broken by the next waiter.
    Two coordinators on two machines promoting at once through one `mlflow server` serialise here;
    a file lock could not see the other machine. Raises TimeoutError after `timeout_s`.
    """
    import socket
    import uuid

    name = lock_model_name(purpose)
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    take_lock(client, name, holder, timeout_s, lease_s)
    try:
        with renewing_lease(client, name, lease_s):
            yield
    finally:
        with contextlib.suppress(Exception):
            if client.get_registered_model(name).tags.get(LOCK_HOLDER_TAG) == holder:
                client.delete_registered_model(name)


@contextlib.contextmanager
def exclusive(client, uri: str, purpose: str, timeout_s: float = 120.0):
    """A lock for `purpose` on this store: a file lock beside a SQLite file (one machine), else `store_lock`."""
    db = sqlite_path(uri)
    if db and db != ":memory:":
        with file_lock(lock_path(uri, purpose), timeout_s):
            yield
    else:
        with store_lock(client, purpose, timeout_s):
            yield


# ----------------------------------------------------------------------------- the store template


def store_template() -> Path:
    """An empty, migrated MLflow SQLite store for the installed MLflow version (copied, never opened)."""
    return database_template("mlflow", DEFAULT_DB)


def seed_store(db: Optional[str]) -> bool:
    """Create the database file `db` as a copy of the template; False if it exists or there is no template."""
    if not db or db == ":memory:" or Path(db).exists():
        return False
    template = store_template()
    if not template.is_file():
        return False
    try:
        sqlite_copy(template, db)
        # MLflow gives a new store's Default experiment ./mlruns/0 under the working directory
        con = sqlite3.connect(db)
        try:
            con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                        (str(Path.cwd().resolve() / "mlruns" / "0"),))
            con.commit()
        finally:
            con.close()
        return True
    except Exception:  # noqa: BLE001  (MLflow then creates the database itself)
        Path(db).unlink(missing_ok=True)
        return False


def save_store_template(db: Optional[str]) -> None:
    """Keep a copy of a freshly migrated, still empty store as the template (an optimisation only)."""
    if not db or db == ":memory:" or not Path(db).is_file() or store_template().exists():
        return
    with contextlib.suppress(Exception):
        sqlite_copy(db, store_template())


def prepare_store_template() -> Path:
    """Create the migrated MLflow store template now (a one-time step of `make setup`)."""
    if not store_template().is_file():
        from mlflow import MlflowClient

        with tempfile.TemporaryDirectory() as tmp:
            db = f"{tmp}/{DEFAULT_DB}"
            MlflowClient(tracking_uri=f"{SQLITE}{db}").search_experiments()  # creates + migrates
            save_store_template(db)
    return store_template()


# ----------------------------------------------------------------------------- opening it


def use_store(cfg: TrackingConfig):
    """Point MLflow (fluent API included) at the configured store; return (client, experiment_id).

    The experiment is created on first use (or restored if it was deleted). First use of a
    SQLite store is serialised by a lock file next to it.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(cfg)
    db = sqlite_path(uri)
    if db:
        Path(db).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with file_lock(lock_path(uri, "init") if db else None):
        seeded = seed_store(db)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # creates + migrates a new DB
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is None and not seeded:
            save_store_template(db)  # MLflow just migrated a new DB: the next one starts from a copy
        if exp is None:
            try:
                exp_id = client.create_experiment(cfg.experiment, artifact_location=artifact_location(cfg))
            except MlflowException as exc:  # another process created it first
                if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "already exists" not in str(exc):
                    raise
                exp_id = client.get_experiment_by_name(cfg.experiment).experiment_id
        else:
            exp_id = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp_id)
    return client, exp_id
