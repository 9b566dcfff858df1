"""MLflow logging for depthtune: the only module that logs runs, params, metrics and models.

It takes the records the stages already wrote (depthtune.records, docs/results.md) and
never recomputes anything. Each variant's results go into its own run under the
pipeline's parent run (depthtune.tracking.runs); the store is depthtune.tracking.store.

Called from the stages:
  run_id = variant_run_id(cfg, variant, resume_run_id=...)              # finetune, before training
  rec = log_variant_training(cfg, variant, audit_result=AuditRecord, train_result=TrainRecord,
                             model_dir=..., params_flat=..., resolved_config=..., run_id=run_id)
  rec = log_variant_evaluation(cfg, variant, eval_result=EvalRecord, run_id=...)   # compare, every variant

Logging never loses outputs: when the store is down, every function warns ONCE on
stderr and returns a record of what was not logged ({enabled, logged, run_id,
tracking_uri, not_logged, errors, ...}); finetune keeps it in its train record, compare
counts it in its log, and both carry on. Secrets never reach MLflow: params, tags, artifacts and error messages
pass through depthtune.tracking.redaction.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from depthtune.evaluation import metrics
from depthtune import tasks
from depthtune.config import TrackingConfig
from depthtune.tracking.runs import (TAG_MODEL_FP, TAG_MODEL_URI, TAG_PARENT, TAG_ROLE, TAG_VARIANT, data_fingerprint,
                                   dvc_lock_hash, git_commit, variant_run)
from depthtune.tracking.store import tracking_uri, use_store
from depthtune.provenance import tree_fingerprint
from depthtune.records import AuditRecord, EvalRecord, TrainRecord
from depthtune.tracking.redaction import REDACTED, describe_error, is_secret_key, redact, redact_text, safe_uri

MAX_PARAMS = 100  # the rest of the config is in the config/resolved_config.json artifact

# ----------------------------------------------------------------------------- failures: warn once, keep a record

_warned = False  # one warning per process: five variants against a dead server must not print fifteen


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        print(f"warning: {message}", file=sys.stderr, flush=True)


def reset_warning() -> None:
    """Let the next logging failure warn again (tests; a long-lived process starting a new pipeline)."""
    global _warned
    _warned = False


def is_unreachable(exc: BaseException) -> bool:
    """True for errors that mean the store is gone (then every later step would fail the same way)."""
    text = f"{type(exc).__name__} {exc}"
    return any(s in text for s in ("ConnectionError", "Connection refused", "Max retries", "timed out", "Timeout",
                                   "API request to", "unable to open database", "NewConnectionError",
                                   "RemoteDisconnected", "Failed to establish"))


class _Steps:
    """Runs logging steps in order; a failed step is recorded, an unreachable store skips the rest."""

    def __init__(self, cfg: TrackingConfig, what: str, variant: str, run_id: Optional[str] = None):
        self.what, self.variant = what, variant
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
            self.record["errors"].append(f"{name}: {describe_error(exc)}")
            if is_unreachable(exc):
                self.down = True
            return None

    def open_run(self, cfg: TrackingConfig, variant: str, resume_run_id: Optional[str], root: str | Path):
        """(client, run id) of the variant's run, or (None, None) with every later step skipped."""
        store = self.step("run", lambda: use_store(cfg))
        client, exp_id = store if store else (None, None)
        rid = self.step("run", lambda: variant_run(client, exp_id, variant, resume_run_id, root)) if store else None
        self.record["run_id"] = rid
        if rid is None:
            self.down = True  # nothing else can work without the run
        return client, rid

    def finish(self) -> dict:
        rec = self.record
        rec["logged"] = not rec["not_logged"]
        if rec["not_logged"]:
            _warn_once(f"MLflow {self.what} logging for variant {self.variant} failed at {rec['tracking_uri']} "
                       f"({rec['errors'][0] if rec['errors'] else 'unknown error'}); outputs are kept; not logged: "
                       f"{', '.join(rec['not_logged'])} (recorded under 'tracking' in the result record)")
        return rec


def _disabled_record() -> dict:
    return {"enabled": False, "logged": False, "run_id": None, "tracking_uri": None, "not_logged": [], "errors": []}


def variant_run_id(cfg: TrackingConfig, variant: str, *, resume_run_id: Optional[str] = None,
                   root: str | Path = ".") -> Optional[str]:
    """The variant's MLflow run id (created under this pipeline's parent run if needed); None if the store is down.

    Pass the id saved in a checkpoint as `resume_run_id` to re-attach a resumed run.
    """
    if not cfg.enabled:
        return None
    steps = _Steps(cfg, "run", variant, resume_run_id)
    run_id = steps.step("run", lambda: variant_run(*use_store(cfg), variant, resume_run_id, root))
    steps.finish()
    return run_id


# ----------------------------------------------------------------------------- params, metrics, tags


def _param_value(v: Any) -> str:
    if isinstance(v, (dict, list, tuple)):
        v = json.dumps(v, sort_keys=True, default=str)
    return str(v)[:6000]  # MLflow's param value limit


def clean_params(params_flat: dict) -> tuple[dict, list]:
    """(params, dropped keys): redacted, stringified, at most MAX_PARAMS keys."""
    items = list(params_flat.items())
    kept, dropped = items[:MAX_PARAMS], [k for k, _ in items[MAX_PARAMS:]]
    out = {}
    for k, v in kept:
        out[str(k)] = REDACTED if is_secret_key(k) and v not in (None, "", False) else redact_text(_param_value(v))
    return out, dropped


def log_params(client, run_id: str, params: dict) -> list:
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


def log_metrics(client, run_id: str, scalars: dict, curves: dict) -> int:
    """Scalars at step 0 (skipped if unchanged), curves {key: [(step, value)]} (steps already there skipped).

    Re-attaching to a run after a resume therefore adds only what is new. Returns how many were logged.
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


def log_tags(client, run_id: str, tags: dict) -> None:
    """Redacted tags (None values skipped), cut to MLflow's 5000-character limit."""
    from mlflow.entities import RunTag

    items = [RunTag(k, redact_text(str(v))[:5000]) for k, v in tags.items() if v is not None]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, tags=items[i:i + 100], synchronous=True)


def log_json_artifact(client, run_id: str, obj: Any, name: str, artifact_path: str) -> None:
    """`obj`, redacted, as <artifact_path>/<name> in the run."""
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / name
        p.write_text(json.dumps(redact(obj), indent=2, default=str) + "\n")
        client.log_artifact(run_id, str(p), artifact_path=artifact_path)


def training_metrics(audit: AuditRecord, train: TrainRecord) -> tuple[dict, dict]:
    """(scalars, curves) from the audit and train records: parameter counts per layer, estimates, costs."""
    m: dict = {"total_params": train.total_params, "trainable_params": train.trainable_params,
               "trainable_fraction": audit.trainable_fraction
               or (train.trainable_params / train.total_params if train.total_params else None)}
    for row in audit.layers:  # embeddings, layer.0 .. layer.k-1, pooler, final_norm, head
        m[f"trainable.{row['name']}"] = row["trainable"]
    adapters = [b for b in audit.buckets if b["name"].endswith("adapter")]
    m["trainable.adapters"] = sum(b["trainable"] for b in adapters) if adapters else audit.adapter_params
    m["audit.adapter_params"] = audit.adapter_params
    for name, est in (("est", audit.estimates), ("est_typical", audit.estimates_typical)):
        for k, v in ((est or {}).get("memory_bytes") or {}).items():
            m[f"{name}.memory_bytes.{k}"] = v
        for k, v in ((est or {}).get("flops_per_token") or {}).items():
            for kk, vv in (v.items() if isinstance(v, dict) else [("", v)]):  # step: {dense, per_position, ...}
                m[f"{name}.flops_per_token.{k}" + (f".{kk}" if kk else "")] = vv
    for k in ("wall_time_s", "train_time_s", "samples_per_s", "tokens_per_s", "steps", "epochs_run", "best_epoch",
              "best_step", "peak_memory_bytes", "estimated_memory_bytes", "memory_ratio", "peak_reserved_bytes",
              "resumed_from_step"):
        m[k] = getattr(train, k)
    timing = train.time_prediction or {}
    for k in ("train_s", "predicted_s_for_steps_run", "time_ratio", "efficiency_measured", "mfu"):
        m[f"time.{k}"] = timing.get(k)
    for k in ("gemm_flops_per_s", "efficiency"):
        m[f"time.{k}"] = (timing.get("throughput") or {}).get(k)
    for k, v in train.best_val.items():
        m[f"best_val.{k}"] = v
    m["stopped_early"] = int(train.stopped_early)
    m["not_converged"] = int(train.not_converged)
    m["near_chance"] = int(train.near_chance)
    m["extensions"] = train.extensions
    if train.rise:  # the plateau test (depthtune.evaluation.convergence)
        m["convergence.gain"], m["convergence.p"] = train.rise.get("gain"), train.rise.get("p")
    curves = {"train.loss": [(p["step"], p.get("loss")) for p in train.loss_curve],
              "train.lr": [(p["step"], p.get("lr")) for p in train.loss_curve if p.get("lr") is not None],
              **{f"val.{k}": [(p["step"], p.get(k)) for p in train.val_curve]
                 for k in dict.fromkeys(k for p in train.val_curve for k in p if k not in ("step", "epoch"))}}
    if train.lr_search:  # one run, no nested runs: the candidates are series over candidate index (smallest lr first)
        search = train.lr_search
        key = f"val_{search['metric']}"
        m["lr_search.chosen_lr"], m["lr_search.seconds"] = search["chosen_lr"], search["seconds"]
        m["lr_search.extra_steps"] = search.get("extra_steps", 0)  # what the losing candidates trained
        curves["lr_search.lr"] = [(i, c["lr"]) for i, c in enumerate(search["candidates"])]
        curves[f"lr_search.{key}"] = [(i, c[key]) for i, c in enumerate(search["candidates"])]
    return {k: v for k, v in m.items() if _finite(v)}, curves


def _metric_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", str(text))  # what MLflow accepts in a metric key


def evaluation_metrics(ev: EvalRecord) -> dict:
    """<split>.accuracy/macro_*/n (causal_lm: loss/perplexity/bits_per_byte/tokens_per_s),
    <split>.class.<label>.<metric>, latency_ms.<p>, throughput_per_s, the intervals, the seeds' spread."""
    task = tasks.get(ev.task)
    scored = task.metrics
    names = (("loss",) + scored + ("tokens_per_s", "n") if task.per_position
             else scored + ("macro_precision", "macro_recall", "n"))
    m = {f"{ev.split}.{k}": getattr(ev, k) for k in names}
    for name, row in ev.per_class.items():
        for k, v in row.items():
            m[f"{ev.split}.class.{_metric_name(name)}.{k}"] = v
    for k, v in ev.latency_ms.items():
        m[f"latency_ms.{k}"] = v
    m["throughput_per_s"] = ev.throughput_per_s
    for name in scored:  # the 95% bootstrap interval over test texts
        low, high = getattr(ev, f"{name}_ci")
        m[f"{ev.split}.{name}_ci_low"], m[f"{ev.split}.{name}_ci_high"] = low, high
    if len(ev.seed_scores) > 1:  # train.seeds > 1: the spread across seeds' models on the same texts
        key = scored[0]
        vals = [s[key] for s in ev.seed_scores]
        mean = sum(vals) / len(vals)
        m[f"{ev.split}.{key}_seed_mean"], m[f"{ev.split}.{key}_seed_n"] = mean, len(vals)
        m[f"{ev.split}.{key}_seed_sd"] = (sum((a - mean) ** 2 for a in vals) / (len(vals) - 1)) ** 0.5
    return {k: v for k, v in m.items() if _finite(v)}


# ----------------------------------------------------------------------------- training


def _saved_labels(model_dir: Path) -> Optional[list]:
    """Label names of a saved model folder, None if it cannot say."""
    if not (model_dir / "config.json").is_file():
        return None
    from depthtune.serving import model_labels  # serving imports mlflow.pyfunc (~2 s): only when logging

    with contextlib.suppress(Exception):
        return model_labels(model_dir)
    return None


def training_tags(variant: str, audit: AuditRecord, train: TrainRecord, model_dir: Path, params_flat: dict,
                  root: Path) -> dict:
    """The variant run's tags: what it is (depth, sizes, labels) and what produced it (commit, data, inputs)."""
    labels = _saved_labels(model_dir)
    data_fp = data_fingerprint(root)
    inputs_fp = hashlib.sha256(json.dumps({"params": params_flat, "data": data_fp, "audit": audit.buckets},
                                          sort_keys=True, default=str).encode()).hexdigest()
    commit = git_commit(root)
    return {TAG_VARIANT: variant, TAG_ROLE: "variant", "depthtune.description": audit.description,
            "depthtune.depth": audit.architecture.get("num_layers"),
            "depthtune.model_type": audit.architecture.get("model_type"),
            "depthtune.total_params": train.total_params, "depthtune.trainable_params": train.trainable_params,
            "depthtune.git_commit": commit, "mlflow.source.git.commit": commit,
            "depthtune.dvc_lock_hash": dvc_lock_hash(f"finetune@{variant}", root),
            "depthtune.inputs_fingerprint": inputs_fp, "depthtune.data_fingerprint": data_fp,
            "depthtune.device": train.device, "depthtune.labels": json.dumps(labels) if labels else None,
            "depthtune.convergence": (f"{train.convergence}: {train.convergence_note}" if train.convergence_note
                                      else train.convergence or "converged"),
            "mlflow.note.content": f"{variant}: {audit.description}"}


def log_variant_training(cfg: TrackingConfig, variant: str, *, audit_result: AuditRecord, train_result: TrainRecord,
                         model_dir: str | Path, params_flat: dict, resolved_config: dict,
                         run_id: Optional[str] = None, root: str | Path = ".", log_model: bool = True) -> dict:
    """Log one trained variant; returns {enabled, logged, run_id, model_uri, not_logged, errors, ...}. Never raises."""
    if not cfg.enabled:
        return _disabled_record()
    audit, train, root, model_dir = audit_result, train_result, Path(root), Path(model_dir)
    steps = _Steps(cfg, "training", variant, run_id)
    rec = steps.record
    client, rid = steps.open_run(cfg, variant, run_id or train.run_id(), root)
    tags = training_tags(variant, audit, train, model_dir, params_flat, root)
    params, dropped = clean_params(params_flat)
    if dropped:
        rec["params_dropped"] = dropped  # over MAX_PARAMS: still in config/resolved_config.json
    conflicts = steps.step("params", lambda: log_params(client, rid, params))
    if conflicts:
        rec["param_conflicts"] = conflicts
        tags["depthtune.param_conflicts"] = ",".join(conflicts)[:5000]
    steps.step("tags", lambda: log_tags(client, rid, tags))
    scalars, curves = training_metrics(audit, train)
    steps.step("metrics", lambda: log_metrics(client, rid, scalars, curves))
    steps.step("config_artifact", lambda: log_json_artifact(client, rid, resolved_config, "resolved_config.json",
                                                            "config"))
    steps.step("audit_artifact", lambda: log_json_artifact(client, rid, audit.to_dict(), f"{variant}.json", "audit"))
    if train.lr_search:
        steps.step("lr_search_artifact", lambda: log_json_artifact(client, rid, train.lr_search, "lr_search.json",
                                                                   "train"))
    if log_model:
        model_fp = tree_fingerprint(model_dir)
        rec["model_uri"] = steps.step("model", lambda: _log_model_once(client, rid, model_dir, model_fp))
    if not steps.down:
        steps.step("status", lambda: _finish(client, rid))
    return steps.finish()


def _log_model_once(client, run_id: str, model_dir: Path, model_fp: Optional[str]) -> str:
    """Log the pyfunc model unless this run already holds the same weights (a re-run after a crash)."""
    import mlflow

    from depthtune import serving  # imports mlflow.pyfunc: paid only when a model is logged

    tags = client.get_run(run_id).data.tags
    if model_fp and tags.get(TAG_MODEL_FP) == model_fp and tags.get(TAG_MODEL_URI):
        return tags[TAG_MODEL_URI]
    t0 = time.perf_counter()
    active = mlflow.active_run()
    ctx = contextlib.nullcontext() if active and active.info.run_id == run_id else mlflow.start_run(run_id=run_id)
    with ctx:
        info = serving.log_pyfunc_model(model_dir, name="model", tags={TAG_VARIANT: tags.get(TAG_VARIANT, "")})
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


# ----------------------------------------------------------------------------- evaluation


def log_variant_evaluation(cfg: TrackingConfig, variant: str, *, eval_result: EvalRecord,
                           confusion_csv_path: str | Path | None = None, run_id: Optional[str] = None,
                           root: str | Path = ".") -> dict:
    """Log test metrics + confusion matrix into the variant's run (the one its training used). Never raises."""
    if not cfg.enabled:
        return _disabled_record()
    ev = eval_result
    steps = _Steps(cfg, "evaluation", variant, run_id)
    client, rid = steps.open_run(cfg, variant, run_id, root)
    steps.step("metrics", lambda: log_metrics(client, rid, evaluation_metrics(ev), {}))
    steps.step("eval_artifact", lambda: log_json_artifact(client, rid, ev.to_dict(), f"{variant}.json", "eval"))
    if tasks.get(ev.task).labelled:
        steps.step("confusion_matrix", lambda: _log_confusion(client, rid, ev))
    if confusion_csv_path is not None and Path(confusion_csv_path).is_file():
        steps.step("confusion_csv", lambda: client.log_artifact(rid, str(confusion_csv_path), artifact_path="eval"))
    return steps.finish()


def confusion_csv_text(ev: EvalRecord) -> str:
    """The matrix as a labelled CSV: rows = true label, columns = predicted."""
    labels = ev.labels or [str(i) for i in range(len(ev.confusion_matrix))]
    lines = ["actual\\predicted," + ",".join(labels)]
    lines += [f"{labels[i]}," + ",".join(str(int(c)) for c in row) for i, row in enumerate(ev.confusion_matrix)]
    return "\n".join(lines) + "\n"


def _log_confusion(client, run_id: str, ev: EvalRecord) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "confusion_matrix.csv"
        p.write_text(confusion_csv_text(ev))
        client.log_artifact(run_id, str(p), artifact_path="eval")


# ----------------------------------------------------------------------------- pretraining

from depthtune.tracking.runs import find_or_create_run, parent_run_id  # noqa: E402  (appended section)

TAG_STAGE = "depthtune.stage"


def log_pretraining(cfg: TrackingConfig, record: dict, *, resolved_config: dict, root: str | Path = ".") -> dict:
    """The pretrain stage's one run (tag depthtune.stage=pretrain, under the pipeline's parent run): its
    figures, the loss and held-out perplexity curves, the record as an artifact. Never raises."""
    if not cfg.enabled:
        return _disabled_record()
    steps = _Steps(cfg, "pretraining", "pretrain", record.get("mlflow_run_id"))

    def open_run():
        client, exp_id = use_store(cfg)
        parent = parent_run_id(client, exp_id, root)
        return client, find_or_create_run(client, exp_id, {TAG_PARENT: parent, TAG_STAGE: "pretrain"},
                                          {TAG_ROLE: "pretrain"}, "pretrain")
    opened = steps.step("run", open_run)
    if opened is None:
        return steps.finish()
    client, rid = opened
    steps.record["run_id"] = rid
    scalars = {k: record.get(k) for k in ("steps", "tokens", "tokens_per_s", "mfu", "gemm_flops_per_s",
                                          "train_time_s", "total_params", "final_perplexity")}
    scalars.update({f"coverage.{s}.unk_fraction": c.get("unk_fraction") for s, c in record.get("coverage", {}).items()})
    curves = {"pretrain.loss": [(p["step"], p["loss"]) for p in record.get("loss_curve", [])],
              "pretrain.val_perplexity": [(p["step"], p[metrics.PRETRAIN.name]) for p in record.get("val_curve", [])]}
    flat = {f"pretrain.{k}": v for k, v in resolved_config.get("pretrain", {}).items()}
    steps.step("params", lambda: log_params(client, rid, clean_params(flat)[0]))
    steps.step("tags", lambda: log_tags(client, rid, {"mlflow.note.content": f"pretrain: {record.get('objective')} "
                                                      f"from {record.get('base')}"}))
    steps.step("metrics", lambda: log_metrics(client, rid, scalars, curves))
    steps.step("record_artifact", lambda: log_json_artifact(client, rid, record, "pretrain.json", "pretrain"))
    if not steps.down:
        steps.step("status", lambda: _finish(client, rid))
    return steps.finish()
