"""MLflow logging for depthtune: the only module that logs runs, params, metrics and models.

It takes the per-variant result dicts the stages already wrote (docs/results.md)
and never recomputes anything. Layout in the MLflow experiment:

  pipeline-<key>            parent run, one per pipeline execution (tag depthtune.pipeline_key)
    ├── full                nested run per variant (tags depthtune.variant + mlflow.parentRunId)
    ├── top2                ... params, metrics, curves, audit JSON, pyfunc model, eval
    └── ...

Re-running or resuming a stage re-attaches to the same runs instead of making
new ones: the parent is found by its pipeline key (DEPTHTUNE_PIPELINE_KEY, set
by flows/pipeline, or git commit + params.yaml hash + prepared-data fingerprint),
the child by (parent, variant) or by the run id the finetune stage saved.

Logging never loses outputs: when the store is down, every function warns ONCE
on stderr and returns a record of what was not logged; the stage writes that
record into its result JSON and carries on. Secrets never reach MLflow:
TOKEN/SECRET/PASSWORD/KEY-like keys and values are redacted.

Called from the stages:
  run_id = variant_run_id(cfg, variant, resume_run_id=ckpt.get("mlflow_run_id"))   # finetune, before training
  rec = log_variant_training(cfg, variant, audit_result=..., train_result=..., model_dir=..., params_flat=...,
                             resolved_config=..., run_id=run_id)                      # finetune, after saving
  rec = log_variant_evaluation(cfg, variant, eval_result=..., confusion_csv_path=..., run_id=...)   # evaluation
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from depthtune import runtime  # noqa: F401  (offline + telemetry-off defaults)
from depthtune.config import TrackingConfig
from depthtune.files import PROJECT_ROOT, database_template, sqlite_copy
from depthtune.provenance import file_sha256, git_sha, tree_fingerprint

# A dead server must cost seconds, not minutes of urllib3 retries with backoff.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

PIPELINE_KEY_ENV = "DEPTHTUNE_PIPELINE_KEY"
TAG_KEY = "depthtune.pipeline_key"
TAG_ROLE = "depthtune.role"
TAG_VARIANT = "depthtune.variant"
TAG_PARENT = "mlflow.parentRunId"
TAG_MODEL_URI = "depthtune.model_uri"
TAG_MODEL_FP = "depthtune.model_fingerprint"
MAX_PARAMS = 100
CURVE_KEYS = ("train.loss", "train.lr", "val.accuracy", "val.macro_f1")

# ----------------------------------------------------------------------------- secrets

_SECRET_WORDS = {"token", "secret", "password", "passwd", "key", "apikey", "credential", "credentials",
                 "auth", "authorization"}
_SECRET_SUFFIXES = ("token", "secret", "password", "apikey", "accesskey")
_SECRET_VALUE_RE = re.compile(
    r"(hf_[A-Za-z0-9]{16,}|gh[pousr]_[A-Za-z0-9]{16,}|github_pat_[A-Za-z0-9_]{20,}|sk-[A-Za-z0-9_-]{16,}"
    r"|AKIA[0-9A-Z]{16}|xox[abprs]-[A-Za-z0-9-]{10,}|eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]+)")
_URL_CREDENTIALS_RE = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]+(:[^/@\s]*)?@")
REDACTED = "<redacted>"


def is_secret_key(key: str) -> bool:
    """`hf_token`, `API_KEY`, `db.password`, `authToken` -> True; `tokenizer`, `tokens_per_s` -> False."""
    words = [w.lower() for w in re.split(r"[^A-Za-z0-9]+|(?<=[a-z])(?=[A-Z])", str(key)) if w]
    return any(w in _SECRET_WORDS or w.endswith(_SECRET_SUFFIXES) for w in words)


def _secret_env_values() -> list[str]:
    return [v for k, v in os.environ.items() if is_secret_key(k) and len(v) >= 6]


def redact_text(text: str) -> str:
    """Remove env secrets, known token formats and URL credentials from a string."""
    for v in _secret_env_values():
        if v in text:
            text = text.replace(v, REDACTED)
    text = _SECRET_VALUE_RE.sub(REDACTED, text)
    return _URL_CREDENTIALS_RE.sub(lambda m: m.group("scheme") + REDACTED + "@", text)


def redact(obj: Any) -> Any:
    """Deep copy of a JSON-like object with secret-looking keys and values redacted."""
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_key(k) and obj[k] not in (None, "", False) else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


# ----------------------------------------------------------------------------- the store


def tracking_uri(cfg: TrackingConfig) -> str:
    """cfg.uri, or sqlite:///<project root>/mlflow.db; relative sqlite paths become absolute."""
    uri = cfg.uri or f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path and not path.startswith("/") and path != ":memory:":
            uri = f"sqlite:///{(PROJECT_ROOT / path).resolve()}"
    elif "://" not in uri:  # a bare path: MLflow would use the deprecated file store
        uri = f"sqlite:///{(PROJECT_ROOT / uri).resolve()}" if uri.endswith(".db") else uri
    return uri


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def artifact_location(cfg: TrackingConfig) -> Optional[str]:
    """Absolute `<artifact_root>/<experiment>` for local stores; a server picks its own unless told."""
    uri = tracking_uri(cfg)
    if cfg.artifact_root is None and is_remote(uri):
        return None  # the server's --artifacts-destination (mlflow-artifacts:/) decides
    root = cfg.artifact_root or str(PROJECT_ROOT / "mlartifacts")
    if "://" in root:
        return f"{root.rstrip('/')}/{cfg.experiment}"
    return str((PROJECT_ROOT / root).resolve() / cfg.experiment)


def safe_uri(uri: str) -> str:
    return _URL_CREDENTIALS_RE.sub(lambda m: m.group("scheme") + REDACTED + "@", uri)


@contextlib.contextmanager
def _file_lock(path: Optional[str], timeout_s: float = 120.0):
    """An exclusive lock file (POSIX); no-op where unavailable."""
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
                    raise TimeoutError(f"could not lock {path} within {timeout_s:.0f} s")
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def sqlite_path(uri: str) -> Optional[str]:
    return uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None


def lock_path(uri: str, purpose: str) -> str:
    """A lock file next to a SQLite store, else in the temp dir keyed by the URI."""
    db = sqlite_path(uri)
    if db and db != ":memory:":
        return f"{db}.{purpose}.lock"
    h = hashlib.sha256(uri.encode()).hexdigest()[:12]
    return str(Path(tempfile.gettempdir()) / f"depthtune-{purpose}-{h}.lock")


def _store_template() -> Path:
    """An empty, migrated MLflow SQLite store for this MLflow version: a new mlflow.db starts as a
    copy instead of running MLflow's ~50 schema migrations (~2.5 s on 2 cores)."""
    return database_template("mlflow", "mlflow.db")


def _seed_store(db: Optional[str]) -> bool:
    if not db or db == ":memory:" or Path(db).exists():
        return False
    template = _store_template()
    if not template.is_file():
        return False
    try:
        sqlite_copy(template, db)
        import sqlite3

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


def _save_store_template(db: Optional[str]) -> None:
    if not db or db == ":memory:" or not Path(db).is_file() or _store_template().exists():
        return
    try:
        sqlite_copy(db, _store_template())
    except Exception:  # noqa: BLE001  (an optimisation only)
        pass


def prepare_store_template() -> Path:
    """Create the migrated MLflow store template now (a one-time step of `make setup`)."""
    if not _store_template().is_file():
        with tempfile.TemporaryDirectory() as tmp:
            from mlflow import MlflowClient

            db = f"{tmp}/mlflow.db"
            MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
            _save_store_template(db)
    return _store_template()


def use_store(cfg: TrackingConfig):
    """Point MLflow (fluent API included) at the configured store; return (client, experiment_id).

    Creating a fresh SQLite DB from several processes at once races on migrations
    (shared/STACK.md), so first use of a SQLite store is serialised by a lock file.
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
    with _file_lock(lock_path(uri, "init") if db else None):
        seeded = _seed_store(db)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # creates + migrates a new DB
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is None and not seeded:
            _save_store_template(db)
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


def config_from_params(path: str | Path = "params.yaml") -> TrackingConfig:
    """The `tracking` section of params.yaml if there is one here, else the defaults."""
    from depthtune.config import load_params

    path = Path(path)
    if not path.is_file() and (PROJECT_ROOT / "params.yaml").is_file():
        path = PROJECT_ROOT / "params.yaml"
    return load_params(path).tracking if path.is_file() else TrackingConfig()


# ----------------------------------------------------------------------------- fingerprints


def data_fingerprint(root: str | Path = ".") -> Optional[str]:
    """sha256 over the prepared splits + labels (what every variant trained and was tested on)."""
    return tree_fingerprint(Path(root) / "data" / "prepared")


def dvc_lock_hash(stage: str, root: str | Path = ".") -> Optional[str]:
    """sha256 of a stage's recorded deps + params in dvc.lock (None if dvc.lock has no such stage)."""
    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return None
    import yaml

    try:
        # libyaml when present: the pure-Python parser spends ~0.5 s on a 5-variant dvc.lock
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        entry = (yaml.load(lock.read_text(), Loader=loader) or {}).get("stages", {}).get(stage)
    except (yaml.YAMLError, OSError, AttributeError):
        return None
    if not entry:
        return None
    blob = json.dumps({"deps": entry.get("deps"), "params": entry.get("params")}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def git_commit(root: str | Path = ".") -> Optional[str]:
    """HEAD without the -dirty suffix (stages write tracked metrics mid-pipeline); falls back to the code's repo."""
    sha = git_sha(root) or git_sha(PROJECT_ROOT)
    return sha[:-len("-dirty")] if sha and sha.endswith("-dirty") else sha


def pipeline_key(root: str | Path = ".") -> str:
    """DEPTHTUNE_PIPELINE_KEY, else sha256(git commit | params.yaml | prepared data)[:16]."""
    env = os.environ.get(PIPELINE_KEY_ENV)
    if env:
        return env
    root = Path(root)
    params = root / "params.yaml"
    parts = [git_commit(root) or "no-git", file_sha256(params) if params.is_file() else "no-params",
             data_fingerprint(root) or "no-data"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- failures: warn once, keep a record

_WARNED = False


# Wall time spent in this module's entry points (mlflow import, store, logging), for the
# orchestration-overhead figure (flows/stage.py records it per stage process).
_SPENT = {"s": 0.0, "depth": 0}


def seconds_spent() -> float:
    return _SPENT["s"]


def _timed(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _SPENT["depth"] += 1
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _SPENT["depth"] -= 1
            if _SPENT["depth"] == 0:  # nested entry points count once
                _SPENT["s"] += time.perf_counter() - t
    return wrapper


def _warn_once(message: str) -> None:
    global _WARNED
    if not _WARNED:
        _WARNED = True
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _reset_warning() -> None:  # tests
    global _WARNED
    _WARNED = False


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return redact_text(f"{type(exc).__name__}: {text}"[:300])


def _unreachable(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return any(s in text for s in ("ConnectionError", "Connection refused", "Max retries", "timed out", "Timeout",
                                   "API request to", "unable to open database", "NewConnectionError",
                                   "RemoteDisconnected", "Failed to establish"))


class _Logger:
    """Runs logging steps in order; a failed step is recorded, an unreachable store skips the rest."""

    def __init__(self, cfg: TrackingConfig, what: str, variant: str, run_id: Optional[str] = None):
        self.cfg, self.what, self.variant = cfg, what, variant
        self.record: dict = {"enabled": cfg.enabled, "logged": False, "run_id": run_id,
                             "tracking_uri": safe_uri(tracking_uri(cfg)), "not_logged": [], "errors": []}
        self.down = False

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        if self.down:
            self.record["not_logged"].append(name)
            return None
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001  (logging must never fail the stage)
            self.record["not_logged"].append(name)
            self.record["errors"].append(f"{name}: {_short(exc)}")
            if _unreachable(exc):
                self.down = True
            return None

    def finish(self) -> dict:
        rec = self.record
        rec["logged"] = not rec["not_logged"]
        if rec["not_logged"]:
            _warn_once(f"MLflow {self.what} logging for variant {self.variant} failed at {rec['tracking_uri']} "
                       f"({rec['errors'][0] if rec['errors'] else 'unknown error'}); outputs are kept; not logged: "
                       f"{', '.join(rec['not_logged'])} (recorded under 'mlflow' in the result JSON)")
        return rec


def _disabled_record() -> dict:
    return {"enabled": False, "logged": False, "run_id": None, "tracking_uri": None, "not_logged": [], "errors": []}


# ----------------------------------------------------------------------------- runs: one parent, one child per variant


def _find_runs(client, exp_id: str, tags: dict) -> list:
    from mlflow.entities import ViewType

    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([exp_id], filter_string=flt, run_view_type=ViewType.ACTIVE_ONLY, max_results=50)
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def _find_or_create(client, exp_id: str, tags: dict, extra_tags: dict, run_name: str) -> str:
    """First run with `tags`, else a new one. Two creators racing both keep the oldest; the loser deletes its own."""
    runs = _find_runs(client, exp_id, tags)
    if runs:
        return runs[0].info.run_id
    mine = client.create_run(exp_id, tags={**tags, **extra_tags}, run_name=run_name).info.run_id
    runs = _find_runs(client, exp_id, tags)
    winner = runs[0].info.run_id if runs else mine
    if winner != mine:
        client.delete_run(mine)
    return winner


def parent_run_id(client, exp_id: str, root: str | Path = ".") -> str:
    key = pipeline_key(root)
    root = Path(root)
    params = root / "params.yaml"
    extra = {"depthtune.git_commit": git_commit(root) or "",
             "depthtune.params_sha256": file_sha256(params) if params.is_file() else "",
             "depthtune.data_fingerprint": data_fingerprint(root) or ""}
    return _find_or_create(client, exp_id, {TAG_KEY: key, TAG_ROLE: "pipeline"}, extra, f"pipeline-{key[:8]}")


def _usable_run(client, run_id: Optional[str], exp_id: str, variant: str) -> bool:
    if not run_id:
        return False
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001  (deleted DB, unknown id: fall back to a search)
        return False
    return (run.info.lifecycle_stage == "active" and run.info.experiment_id == exp_id
            and run.data.tags.get(TAG_VARIANT) == variant)


def _variant_run(client, exp_id: str, variant: str, resume_run_id: Optional[str], root: str | Path) -> str:
    if _usable_run(client, resume_run_id, exp_id, variant):
        return resume_run_id
    parent = parent_run_id(client, exp_id, root)
    return _find_or_create(client, exp_id, {TAG_PARENT: parent, TAG_VARIANT: variant},
                           {TAG_ROLE: "variant", TAG_KEY: pipeline_key(root)}, variant)


@_timed
def variant_run_id(cfg: TrackingConfig, variant: str, *, resume_run_id: Optional[str] = None,
                   root: str | Path = ".") -> Optional[str]:
    """The variant's MLflow run id (created under this pipeline's parent run if needed); None if the store is down.

    Pass the id saved in a checkpoint as `resume_run_id` to re-attach a resumed run.
    """
    if not cfg.enabled:
        return None
    log = _Logger(cfg, "run", variant, resume_run_id)
    run_id = log.step("run", lambda: _variant_run(*use_store(cfg), variant, resume_run_id, root))
    log.finish()
    return run_id


# ----------------------------------------------------------------------------- params, metrics, tags


def _param_value(v: Any) -> str:
    if isinstance(v, (dict, list, tuple)):
        v = json.dumps(v, sort_keys=True, default=str)
    return str(v)[:6000]


def clean_params(params_flat: dict) -> tuple[dict, list]:
    """Redacted, stringified, at most MAX_PARAMS keys (the rest are in the config artifact)."""
    items = list(params_flat.items())
    kept, dropped = items[:MAX_PARAMS], [k for k, _ in items[MAX_PARAMS:]]
    out = {}
    for k, v in kept:
        out[str(k)] = REDACTED if is_secret_key(k) and v not in (None, "", False) else redact_text(_param_value(v))
    return out, dropped


def _log_params(client, run_id: str, params: dict) -> list:
    """Log params not yet on the run; returns keys whose existing value differs (params are immutable)."""
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    conflicts = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i:i + 100], synchronous=True)
    return conflicts


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _log_metrics(client, run_id: str, scalars: dict, curves: dict) -> int:
    """Scalars at step 0 (skipped if unchanged), curves {key: [(step, value)]} (steps already there skipped).

    Re-attaching to a run after a resume therefore adds only what is new.
    """
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    have = client.get_run(run_id).data.metrics
    batch = [Metric(k, float(v), now, 0) for k, v in scalars.items()
             if _finite(v) and not (k in have and math.isclose(have[k], float(v), rel_tol=1e-12, abs_tol=0.0))]
    for key, points in curves.items():
        done = {m.step for m in client.get_metric_history(run_id, key)} if points else set()
        batch += [Metric(key, float(v), now, int(s)) for s, v in points if _finite(v) and int(s) not in done]
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i:i + 1000], synchronous=True)
    return len(batch)


def _log_tags(client, run_id: str, tags: dict) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, redact_text(str(v))[:5000]) for k, v in tags.items() if v is not None]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, tags=items[i:i + 100], synchronous=True)


def _log_json_artifact(client, run_id: str, obj: Any, name: str, artifact_path: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / name
        p.write_text(json.dumps(redact(obj), indent=2, default=str) + "\n")
        client.log_artifact(run_id, str(p), artifact_path=artifact_path)


def training_metrics(audit_result: dict, train_result: dict) -> tuple[dict, dict]:
    """(scalars, curves) from the audit and train result dicts (docs/results.md)."""
    a, t = audit_result or {}, train_result or {}
    m: dict = {}
    for k in ("total_params", "trainable_params", "trainable_fraction"):
        m[k] = t.get(k, a.get(k))
    if m.get("trainable_fraction") is None and m.get("total_params"):
        m["trainable_fraction"] = m["trainable_params"] / m["total_params"]
    for row in a.get("layers", []):  # embeddings, layer.0 .. layer.k-1, pooler, final_norm, head
        m[f"trainable.{row['name']}"] = row["trainable"]
    adapters = [b for b in a.get("buckets", []) if b["name"].endswith("adapter")]
    m["trainable.adapters"] = sum(b["trainable"] for b in adapters) if adapters else a.get("adapter_params", 0)
    m["audit.adapter_params"] = a.get("adapter_params")
    for name, est in (("est", a.get("estimates")), ("est_typical", a.get("estimates_typical"))):
        for k, v in ((est or {}).get("memory_bytes") or {}).items():
            m[f"{name}.memory_bytes.{k}"] = v
        for k, v in ((est or {}).get("flops_per_token") or {}).items():
            m[f"{name}.flops_per_token.{k}"] = v
    for k in ("wall_time_s", "train_time_s", "samples_per_s", "tokens_per_s", "steps", "epochs_run", "best_epoch",
              "best_step", "peak_memory_bytes", "estimated_memory_bytes", "memory_ratio", "resumed_from_step"):
        m[k] = t.get(k)
    for k, v in (t.get("best_val") or {}).items():
        m[f"best_val.{k}"] = v
    if t.get("stopped_early") is not None:
        m["stopped_early"] = int(bool(t["stopped_early"]))
    curves = {"train.loss": [(p["step"], p.get("loss")) for p in t.get("loss_curve", [])],
              "train.lr": [(p["step"], p.get("lr")) for p in t.get("loss_curve", []) if p.get("lr") is not None],
              "val.accuracy": [(p["step"], p.get("accuracy")) for p in t.get("val_curve", [])],
              "val.macro_f1": [(p["step"], p.get("macro_f1")) for p in t.get("val_curve", [])]}
    return {k: v for k, v in m.items() if _finite(v)}, curves


def _metric_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", str(text))


def evaluation_metrics(eval_result: dict) -> dict:
    e = eval_result or {}
    split = e.get("split", "test")
    m = {f"{split}.{k}": e.get(k) for k in ("accuracy", "macro_f1", "macro_precision", "macro_recall", "n")}
    for name, row in (e.get("per_class") or {}).items():
        for k, v in row.items():
            m[f"{split}.class.{_metric_name(name)}.{k}"] = v
    for k, v in (e.get("latency_ms") or {}).items():
        m[f"latency_ms.{k}"] = v
    m["throughput_per_s"] = e.get("throughput_per_s")
    return {k: v for k, v in m.items() if _finite(v)}


# ----------------------------------------------------------------------------- the two entry points


@_timed
def log_variant_training(cfg: TrackingConfig, variant: str, *, audit_result: dict, train_result: dict,
                         model_dir: str | Path, params_flat: dict, resolved_config: dict,
                         run_id: Optional[str] = None, root: str | Path = ".", log_model: bool = True) -> dict:
    """Log one trained variant; returns {enabled, logged, run_id, model_uri, not_logged, errors, ...}. Never raises."""
    if not cfg.enabled:
        return _disabled_record()
    log = _Logger(cfg, "training", variant, run_id)
    rec = log.record
    store = log.step("run", lambda: use_store(cfg))
    if store is None:
        log.down = True  # nothing else can work without the store
    client, exp_id = store if store else (None, None)
    resume = run_id or train_result.get("mlflow_run_id")
    rid = log.step("run", lambda: _variant_run(client, exp_id, variant, resume, root)) if store else None
    rec["run_id"] = rid
    if rid is None:
        log.down = True
    root = Path(root)
    model_dir = Path(model_dir)
    model_fp = tree_fingerprint(model_dir)
    arch = audit_result.get("architecture") or {}
    labels = None
    if (model_dir / "config.json").is_file():
        with contextlib.suppress(Exception):
            from depthtune.serving import model_labels
            labels = model_labels(model_dir)
    inputs_fp = hashlib.sha256(json.dumps({"params": params_flat, "data": data_fingerprint(root),
                                           "audit": audit_result.get("buckets")},
                                          sort_keys=True, default=str).encode()).hexdigest()
    commit = git_commit(root)
    tags = {TAG_VARIANT: variant, TAG_ROLE: "variant", "depthtune.description": audit_result.get("description"),
            "depthtune.depth": arch.get("num_layers"), "depthtune.model_type": arch.get("model_type"),
            "depthtune.total_params": train_result.get("total_params", audit_result.get("total_params")),
            "depthtune.trainable_params": train_result.get("trainable_params", audit_result.get("trainable_params")),
            "depthtune.git_commit": commit, "mlflow.source.git.commit": commit,
            "depthtune.dvc_lock_hash": dvc_lock_hash(f"finetune@{variant}", root),
            "depthtune.inputs_fingerprint": inputs_fp, "depthtune.data_fingerprint": data_fingerprint(root),
            "depthtune.device": train_result.get("device"), "depthtune.labels": json.dumps(labels) if labels else None,
            "mlflow.note.content": f"{variant}: {audit_result.get('description', '')}"}

    params, dropped = clean_params(params_flat)
    if dropped:
        rec["params_dropped"] = dropped  # over MAX_PARAMS: still in config/resolved_config.json
    conflicts = log.step("params", lambda: _log_params(client, rid, params))
    if conflicts:
        rec["param_conflicts"] = conflicts
        tags["depthtune.param_conflicts"] = ",".join(conflicts)[:5000]
    log.step("tags", lambda: _log_tags(client, rid, tags))
    scalars, curves = training_metrics(audit_result, train_result)
    log.step("metrics", lambda: _log_metrics(client, rid, scalars, curves))
    log.step("config_artifact", lambda: _log_json_artifact(client, rid, resolved_config, "resolved_config.json", "config"))
    log.step("audit_artifact", lambda: _log_json_artifact(client, rid, audit_result, f"{variant}.json", "audit"))
    if log_model:
        rec["model_uri"] = log.step("model", lambda: _log_model_once(client, rid, model_dir, model_fp))
    if not log.down and rid:
        log.step("status", lambda: _finish(client, rid))
    return log.finish()


def _log_model_once(client, run_id: str, model_dir: Path, model_fp: Optional[str]) -> str:
    """Log the pyfunc model unless this run already holds the same weights (a re-run after a crash)."""
    import mlflow

    from depthtune import serving

    tags = client.get_run(run_id).data.tags
    if model_fp and tags.get(TAG_MODEL_FP) == model_fp and tags.get(TAG_MODEL_URI):
        return tags[TAG_MODEL_URI]
    t0 = time.perf_counter()
    active = mlflow.active_run()
    ctx = contextlib.nullcontext() if active and active.info.run_id == run_id else mlflow.start_run(run_id=run_id)
    with ctx:
        info = serving.log_pyfunc_model(model_dir, name="model", tags={"depthtune.variant": tags.get(TAG_VARIANT, "")})
    client.set_tag(run_id, TAG_MODEL_URI, info.model_uri)
    if model_fp:
        client.set_tag(run_id, TAG_MODEL_FP, model_fp)
    client.log_metric(run_id, "timing.log_model_s", time.perf_counter() - t0)
    return info.model_uri


def _finish(client, run_id: str) -> None:
    """Mark the child finished, and its parent too (the last variant to finish leaves it FINISHED)."""
    run = client.get_run(run_id)
    if run.info.status != "FINISHED":
        client.set_terminated(run_id, "FINISHED")
    parent = run.data.tags.get(TAG_PARENT)
    if parent:
        client.set_terminated(parent, "FINISHED")


@_timed
def log_variant_evaluation(cfg: TrackingConfig, variant: str, *, eval_result: dict,
                           confusion_csv_path: str | Path | None = None, run_id: Optional[str] = None,
                           root: str | Path = ".") -> dict:
    """Log test metrics + confusion matrix into the variant's run (the one its training used). Never raises."""
    if not cfg.enabled:
        return _disabled_record()
    log = _Logger(cfg, "evaluation", variant, run_id)
    rec = log.record
    store = log.step("run", lambda: use_store(cfg))
    client, exp_id = store if store else (None, None)
    rid = log.step("run", lambda: _variant_run(client, exp_id, variant, run_id, root)) if store else None
    rec["run_id"] = rid
    if rid is None:
        log.down = True
    log.step("metrics", lambda: _log_metrics(client, rid, evaluation_metrics(eval_result), {}))
    log.step("eval_artifact", lambda: _log_json_artifact(client, rid, eval_result, f"{variant}.json", "eval"))
    if eval_result.get("confusion_matrix") is not None:
        log.step("confusion_matrix", lambda: _log_confusion(client, rid, eval_result))
    if confusion_csv_path is not None and Path(confusion_csv_path).is_file():
        log.step("confusion_csv", lambda: client.log_artifact(rid, str(confusion_csv_path), artifact_path="eval"))
    return log.finish()


def _log_confusion(client, run_id: str, eval_result: dict) -> None:
    """The matrix as a labelled CSV (rows = true, columns = predicted) next to the per-example CSV."""
    labels = eval_result.get("labels") or [str(i) for i in range(len(eval_result["confusion_matrix"]))]
    lines = ["actual\\predicted," + ",".join(labels)]
    lines += [f"{labels[i]}," + ",".join(str(int(c)) for c in row) for i, row in enumerate(eval_result["confusion_matrix"])]
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "confusion_matrix.csv"
        p.write_text("\n".join(lines) + "\n")
        client.log_artifact(run_id, str(p), artifact_path="eval")
