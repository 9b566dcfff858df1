"""Promotion: register the best variant and move the `champion` alias only when it wins.

  1. candidate = best variant by `registry.metric` in metrics/eval/*.json that passes
     `min_metric`, `max_trainable_params` and `max_latency_ms` (p95, batch 1)
  2. load the candidate back from its variant run's logged model; load the current
     `@champion`; refuse if either fails to load or their label mappings differ
  3. re-score BOTH now on the same current test data (data/prepared/test.jsonl):
     old metrics were measured on old data and are not comparable
  4. register the candidate (once: a re-run reuses its version) with tags + a model card
  5. candidate beats champion by >= min_delta -> one `set_registered_model_alias(champion)`;
     otherwise it becomes `challenger` and the reason goes into a version tag and the report.

Refusals raise DepthtuneError before anything in the registry changes. Steps 2-5 run
under a lock file keyed by (store, model name), so two promotions racing on one
machine serialise; the champion alias is re-read just before it is moved.
Aliases only: model version stages are deprecated in MLflow 3.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from depthtune import tracking
from depthtune.config import RegistryConfig, TrackingConfig
from depthtune.errors import DepthtuneError
from depthtune.files import read_json, write_json_atomic
from depthtune.provenance import provenance

SCHEMA = "depthtune.promotion/1"
CHAMPION, CHALLENGER = "champion", "challenger"


# ----------------------------------------------------------------------------- candidates from result files


def _metric_of(ev: dict, metric: str) -> Optional[float]:
    v = ev.get(metric)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def rank_variants(reg: RegistryConfig, eval_dir: Path, train_dir: Path, audit_dir: Path) -> list[dict]:
    """One row per evaluated variant: metric, trainable params, p95 latency, eligible, reasons. Best first."""
    files = sorted(Path(eval_dir).glob("*.json"))
    if not files:
        raise DepthtuneError(f"no candidate metrics: {eval_dir}/*.json not found (run the evaluation stage first)")
    rows = []
    for f in files:
        ev = read_json(f)
        variant = ev.get("variant", f.stem)
        value = _metric_of(ev, reg.metric)
        if value is None:
            raise DepthtuneError(f"candidate metrics missing: {f} has no numeric '{reg.metric}'")
        train_f, audit_f = Path(train_dir) / f"{variant}.json", Path(audit_dir) / f"{variant}.json"
        tr = read_json(train_f) if train_f.is_file() else {}
        au = read_json(audit_f) if audit_f.is_file() else {}
        trainable = tr.get("trainable_params", au.get("trainable_params"))
        latency = (ev.get("latency_ms") or {}).get("p95")
        reasons = []
        if value < reg.min_metric:
            reasons.append(f"{reg.metric} {value:.4f} < min_metric {reg.min_metric}")
        if reg.max_trainable_params is not None and (trainable is None or trainable > reg.max_trainable_params):
            reasons.append(f"trainable params {trainable} > max_trainable_params {reg.max_trainable_params}")
        if reg.max_latency_ms is not None and (latency is None or latency > reg.max_latency_ms):
            reasons.append(f"p95 latency {latency} ms > max_latency_ms {reg.max_latency_ms}")
        if not train_f.is_file():
            reasons.append(f"{train_f} not found")
        rows.append({"variant": variant, "metric": value, "trainable_params": trainable,
                     "total_params": tr.get("total_params", au.get("total_params")), "latency_p95_ms": latency,
                     "eligible": not reasons, "reasons": reasons, "eval": ev, "train": tr, "audit": au})
    # best metric first; ties go to the cheaper variant
    rows.sort(key=lambda r: (-r["metric"], r["trainable_params"] if r["trainable_params"] is not None else 1 << 62,
                             r["variant"]))
    return rows


# ----------------------------------------------------------------------------- scoring on the current test data


def read_test(test_path: Path, labels_path: Path) -> tuple[list[str], list[str], list[str]]:
    """(texts, true label names, label names in id order)."""
    names = read_json(labels_path).get("names")
    if not names:
        raise DepthtuneError(f"{labels_path}: no 'names' list")
    texts, gold = [], []
    try:
        lines = Path(test_path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DepthtuneError(f"{test_path}: not found (run the prepare stage first)") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = json.loads(line)
        label = row["label"]
        gold.append(names[label] if isinstance(label, int) else str(label))
        texts.append(row["text"])
    if not texts:
        raise DepthtuneError(f"{test_path}: no rows")
    return texts, gold, list(names)


def score(predicted: list[str], gold: list[str], names: list[str]) -> dict:
    from sklearn.metrics import f1_score

    acc = sum(p == g for p, g in zip(predicted, gold)) / len(gold)
    f1 = f1_score(gold, predicted, labels=names, average="macro", zero_division=0)
    return {"accuracy": float(acc), "macro_f1": float(f1), "n": len(gold)}


def _load(model_uri: str, what: str):
    """Load a logged/registered depthtune model back (pyfunc) -> TextClassifier, or refuse."""
    from depthtune.serving import TextClassifier

    import mlflow.pyfunc

    try:
        loaded = mlflow.pyfunc.load_model(model_uri)
        inner = loaded.unwrap_python_model()
        if not isinstance(inner, TextClassifier):
            raise TypeError(f"python model is {type(inner).__name__}, not a depthtune TextClassifier")
        loaded.predict(["a smoke test"])  # through the signature, as a user would call it
    except Exception as exc:  # noqa: BLE001
        raise DepthtuneError(f"{what} fails to load back from {model_uri}: {tracking._short(exc)}") from None
    return inner


# ----------------------------------------------------------------------------- registry helpers


def _alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _model_card(row: dict, rescored: dict, reg: RegistryConfig) -> str:
    au, ev, tr = row["audit"], row["eval"], row["train"]
    arch = au.get("architecture") or {}
    est = (au.get("estimates") or {}).get("memory_bytes") or {}
    lines = [f"# {row['variant']}: {au.get('description', '')}", "",
             f"- depth: {arch.get('num_layers')} layers ({arch.get('model_type')}, hidden {arch.get('hidden_size')})",
             f"- parameters: {row['total_params']:,} total, {row['trainable_params']:,} trainable "
             f"({100 * (au.get('trainable_fraction') or 0):.2f}%), adapters {au.get('adapter_params') or 0:,}"
             if row["total_params"] and row["trainable_params"] is not None else "- parameters: unknown",
             f"- {reg.metric}: {row['metric']:.4f} at evaluation (n={ev.get('n')}); re-scored now "
             f"{rescored[reg.metric]:.4f} (n={rescored['n']})",
             f"- macro_f1 {ev.get('macro_f1')}, p95 latency {row['latency_p95_ms']} ms, "
             f"throughput {ev.get('throughput_per_s')}/s",
             f"- training: {tr.get('steps')} steps, {tr.get('epochs_run')} epochs, best val {tr.get('best_val')}, "
             f"{tr.get('train_time_s')} s on {tr.get('device')}",
             f"- estimated train memory {est.get('total')} bytes; measured peak {tr.get('peak_memory_bytes')} "
             f"({tr.get('peak_memory_kind')})", "", "| layer | trainable | total |", "|---|---:|---:|"]
    lines += [f"| {r['name']} | {r['trainable']:,} | {r['total']:,} |" for r in au.get("layers", [])]
    return "\n".join(lines)[:4900]


def _find_version(client, name: str, run_id: str, model_uri: str):
    """The version already registered from this exact logged model, if any (re-runs reuse it)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    model_id = model_uri.split("/", 1)[1] if model_uri.startswith("models:/m-") else None
    for mv in versions:
        if mv.source == model_uri or (model_id and getattr(mv, "model_id", None) == model_id) \
                or (mv.tags or {}).get(tracking.TAG_MODEL_URI) == model_uri:
            return mv
    return None


def _register(client, name: str, row: dict, run_id: str, model_uri: str, tags: dict, card: str):
    import mlflow
    from mlflow.exceptions import MlflowException

    mv = _find_version(client, name, run_id, model_uri)
    if mv is not None:
        return mv, False
    try:
        client.create_registered_model(name, description="depthtune text classifier; aliases: champion, challenger",
                                       tags={"depthtune": "true"})
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "already exists" not in str(exc):
            raise
    mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items() if v is not None})
    client.update_model_version(name, mv.version, description=card)
    return mv, True


# ----------------------------------------------------------------------------- promote


def promote(reg: RegistryConfig, tracking_cfg: TrackingConfig, *, root: str | Path = ".",
            eval_dir: str = "metrics/eval", train_dir: str = "metrics/train", audit_dir: str = "audit",
            test_path: str = "data/prepared/test.jsonl", labels_path: str = "data/prepared/labels.json",
            report_path: Optional[str] = "reports/promotion.json", lock_timeout_s: float = 600.0) -> dict:
    """Pick, register and (maybe) promote the best variant; returns the report (also written to report_path)."""
    root = Path(root)
    t_start = time.perf_counter()
    timings: dict = {}
    report: dict = {"schema": SCHEMA, "model_name": reg.model_name, "metric": reg.metric,
                    "min_delta": reg.min_delta, "min_metric": reg.min_metric, **provenance(root)}

    def done(decision: str, reason: str) -> dict:
        report.update(decision=decision, reason=reason)
        timings["total"] = time.perf_counter() - t_start
        report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        if report_path:
            write_json_atomic(root / report_path, report)
        return report

    if not tracking_cfg.enabled:
        return done("skipped", "tracking.enabled is false: the registry lives in the MLflow store")

    rows = rank_variants(reg, root / eval_dir, root / train_dir, root / audit_dir)
    report["variants"] = [{k: r[k] for k in ("variant", "metric", "trainable_params", "latency_p95_ms", "eligible",
                                              "reasons")} for r in rows]
    eligible = [r for r in rows if r["eligible"]]
    if not eligible:
        return done("no_candidate", "no variant passes the registry constraints: " +
                    "; ".join(f"{r['variant']}: {', '.join(r['reasons'])}" for r in rows))
    row = eligible[0]
    variant = row["variant"]
    report["candidate"] = {"variant": variant, "eval_metric": row["metric"],
                           "trainable_params": row["trainable_params"], "total_params": row["total_params"],
                           "latency_p95_ms": row["latency_p95_ms"]}

    # the store must answer before anything else happens
    uri = tracking.tracking_uri(tracking_cfg)
    report["tracking_uri"] = tracking.safe_uri(uri)
    try:
        client, _ = tracking.use_store(tracking_cfg)
        client.search_registered_models(max_results=1)
    except Exception as exc:  # noqa: BLE001
        raise DepthtuneError(f"tracking store unreachable at {tracking.safe_uri(uri)}: {tracking._short(exc)}") from None

    # the candidate's logged model, from the run its finetune stage recorded
    tr = row["train"]
    run_id = tr.get("mlflow_run_id") or (tr.get("tracking") or {}).get("run_id")  # the latter: store came back later
    if not run_id:
        raise DepthtuneError(f"candidate {variant}: no mlflow_run_id in {train_dir}/{variant}.json "
                             "(tracking was off or down during finetune); re-run finetune@" + variant)
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001
        raise DepthtuneError(f"candidate {variant}: run {run_id} not found in {tracking.safe_uri(uri)} "
                             f"({tracking._short(exc)})") from None
    model_uri = run.data.tags.get(tracking.TAG_MODEL_URI)
    if not model_uri:
        raise DepthtuneError(f"candidate {variant}: run {run_id} has no logged model (tag {tracking.TAG_MODEL_URI})")
    report["candidate"].update(run_id=run_id, model_uri=model_uri)

    texts, gold, names = read_test(root / test_path, root / labels_path)
    data_fp = tracking.data_fingerprint(root)
    report["test_data"] = {"path": test_path, "n": len(texts), "labels": names, "fingerprint": data_fp}

    with tracking._file_lock(tracking.lock_path(uri, f"promote-{reg.model_name}"), lock_timeout_s):
        # load both back and check they label the same way, before touching the registry
        t = time.perf_counter()
        cand = _load(model_uri, f"candidate {variant}")
        timings["load_candidate"] = time.perf_counter() - t
        if cand.labels != names:
            raise DepthtuneError(f"candidate {variant} labels {cand.labels} differ from {labels_path} {names}")
        champ_mv = _alias_version(client, reg.model_name, CHAMPION)
        champ = None
        if champ_mv is not None:
            t = time.perf_counter()
            champ = _load(f"models:/{reg.model_name}@{CHAMPION}", f"champion v{champ_mv.version}")
            timings["load_champion"] = time.perf_counter() - t
            if champ.labels != cand.labels:
                raise DepthtuneError(f"label mapping differs from champion v{champ_mv.version}: {champ.labels} vs "
                                     f"candidate {variant} {cand.labels}; promote by hand after checking "
                                     f"(mlflow: delete alias '{CHAMPION}' of {reg.model_name})")

        t = time.perf_counter()
        cand_score = score(cand.predict_names(texts), gold, names)
        timings["score_candidate"] = time.perf_counter() - t
        report["candidate"]["rescored"] = cand_score
        champ_score = None
        if champ is not None:
            t = time.perf_counter()
            champ_score = score(champ.predict_names(texts), gold, names)
            timings["score_champion"] = time.perf_counter() - t
            report["champion_before"] = {"version": str(champ_mv.version),
                                         "variant": (champ_mv.tags or {}).get("depthtune.variant"),
                                         "rescored": champ_score}
        if abs(cand_score[reg.metric] - row["metric"]) > 0.02:
            report["warning"] = (f"candidate re-scored {reg.metric} {cand_score[reg.metric]:.4f} differs from the "
                                 f"evaluation stage's {row['metric']:.4f} (different data or truncation?)")

        # register (once per logged model)
        au, tr = row["audit"], row["train"]
        tags = {"depthtune.variant": variant, "depthtune.description": au.get("description"),
                "depthtune.depth": (au.get("architecture") or {}).get("num_layers"),
                "depthtune.trainable_params": row["trainable_params"], "depthtune.total_params": row["total_params"],
                f"depthtune.eval.{reg.metric}": row["metric"],
                **{f"depthtune.eval.{k}": row["eval"].get(k) for k in ("accuracy", "macro_f1") if k != reg.metric},
                "depthtune.latency_p95_ms": row["latency_p95_ms"],
                "depthtune.git_commit": run.data.tags.get("depthtune.git_commit") or tracking.git_commit(root),
                "depthtune.dvc_lock_hash": tracking.dvc_lock_hash(f"finetune@{variant}", root)
                or run.data.tags.get("depthtune.inputs_fingerprint"),
                "depthtune.data_fingerprint": run.data.tags.get("depthtune.data_fingerprint") or data_fp,
                "depthtune.labels": json.dumps(cand.labels), tracking.TAG_MODEL_URI: model_uri,
                "depthtune.device": tr.get("device")}
        t = time.perf_counter()
        mv, created = _register(client, reg.model_name, row, run_id, model_uri, tags,
                                _model_card(row, cand_score, reg))
        timings["register"] = time.perf_counter() - t
        version = str(mv.version)
        report["candidate"].update(version=version, newly_registered=created)
        client.set_model_version_tag(reg.model_name, version, f"depthtune.rescored.{reg.metric}",
                                     f"{cand_score[reg.metric]:.6f}")

        # decide; re-read the champion right before moving it (another machine may have promoted meanwhile)
        now = _alias_version(client, reg.model_name, CHAMPION)
        if (now and now.version) != (champ_mv and champ_mv.version):
            raise DepthtuneError(f"champion of {reg.model_name} changed during promotion (now v{now.version}); "
                                 "run promote again")
        value = cand_score[reg.metric]
        if champ_mv is None:
            decision = "promoted"
            reason = f"first champion: {reg.metric} {value:.4f} >= min_metric {reg.min_metric}"
        elif str(champ_mv.version) == version:
            decision = "unchanged"
            reason = f"v{version} is already the champion ({reg.metric} {value:.4f} on the current test data)"
        else:
            old = champ_score[reg.metric]
            gain = value - old
            if gain >= reg.min_delta:
                decision = "promoted"
                reason = (f"{reg.metric} {value:.4f} vs champion v{champ_mv.version} {old:.4f} re-scored on the "
                          f"current test data: +{gain:.4f} >= min_delta {reg.min_delta}")
            else:
                decision = "challenger"
                reason = (f"{reg.metric} {value:.4f} vs champion v{champ_mv.version} {old:.4f} re-scored on the "
                          f"current test data: {gain:+.4f} < min_delta {reg.min_delta}")
        t = time.perf_counter()
        if decision == "promoted":
            client.set_registered_model_alias(reg.model_name, CHAMPION, version)  # THE switch
            timings["alias"] = time.perf_counter() - t
            challenger = _alias_version(client, reg.model_name, CHALLENGER)
            if challenger is not None and str(challenger.version) == version:
                client.delete_registered_model_alias(reg.model_name, CHALLENGER)
            if champ_mv is not None:
                client.set_model_version_tag(reg.model_name, str(champ_mv.version), "depthtune.replaced_by", version)
        elif decision == "challenger":
            client.set_registered_model_alias(reg.model_name, CHALLENGER, version)
            timings["alias"] = time.perf_counter() - t
        # the decision that set the alias stays readable; a later no-op check goes to its own tag
        tag = "depthtune.last_check" if decision == "unchanged" else "depthtune.promotion"
        client.set_model_version_tag(reg.model_name, version, tag, f"{decision}: {reason}")
        after = _alias_version(client, reg.model_name, CHAMPION)
        chall = _alias_version(client, reg.model_name, CHALLENGER)
        report["aliases_after"] = {CHAMPION: after and str(after.version), CHALLENGER: chall and str(chall.version)}
    return done(decision, reason)


def registry_state(tracking_cfg: TrackingConfig, model_name: str) -> dict:
    """{versions: [{version, variant, promotion, aliases}], champion, challenger} for reports and tests."""
    client, _ = tracking.use_store(tracking_cfg)
    rm = client.get_registered_model(model_name)
    aliases = {a: str(v) for a, v in (rm.aliases or {}).items()}
    versions = sorted(client.search_model_versions(f"name = '{model_name}'"), key=lambda v: int(v.version))
    return {"champion": aliases.get(CHAMPION), "challenger": aliases.get(CHALLENGER),
            "versions": [{"version": str(v.version), "variant": (v.tags or {}).get("depthtune.variant"),
                          "promotion": (v.tags or {}).get("depthtune.promotion"),
                          "aliases": [a for a, ver in aliases.items() if str(ver) == str(v.version)]}
                         for v in versions]}
