"""Promotion: register the best variant and move the `champion` alias only when it wins.

  1. rank        candidate = best variant by `registry.metric` in the eval records that passes
                 `min_metric`, `max_trainable_params` and `max_latency_ms` (p95, batch 1)
  2. find        the store answers; the candidate's run (from its train record) holds a logged model
  3. load        the candidate and the current `@champion` load back; refuse if either fails or
                 their label mappings differ (from each other or from labels.json)
  4. rescore     BOTH on the same current test data: old metrics were measured on old data
  5. register    the candidate (once: a re-run reuses its version) with tags + a model card
  6. decide      promoted only when the candidate is significantly better than the champion on
                 those same texts (paired test: McNemar for accuracy, paired bootstrap for
                 macro-F1, p < `alpha`) AND by at least `min_delta`; else challenger (pure)
  7. aliases     promoted: one `set_registered_model_alias(champion)`; challenger: the
                 `challenger` alias; the reason goes into a version tag and the report

Refusals raise DepthtuneError before anything in the registry changes. Steps 3-7 run
under a lock keyed by (store, model name): a file beside a SQLite store, a lock held in
the store's database for a server (depthtune.tracking.store.store_lock), so two promotions racing
on one machine or on two serialise; the champion alias is re-read just before it is moved.
Aliases only: model version stages are deprecated in MLflow 3.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from depthtune import tasks
from depthtune.evaluation import metrics
from depthtune import layout
from depthtune.config import RegistryConfig, TrackingConfig
from depthtune.errors import DepthtuneError
from depthtune.tracking.runs import TAG_MODEL_URI, TAG_VARIANT, data_fingerprint, dvc_lock_hash, git_commit
from depthtune.tracking.store import exclusive, tracking_uri, use_store
from depthtune.provenance import provenance
from depthtune.records import (AuditRecord, EvalRecord, LabelSet, TrainRecord, read_prepared_split,
                               read_variant_record)
from depthtune.tracking.redaction import describe_error, safe_uri
from depthtune.evaluation.convergence import rival_reach
from depthtune.evaluation.significance import lm_paired_bootstrap, paired_test

SCHEMA = "depthtune.promotion/1"
CHAMPION, CHALLENGER = "champion", "challenger"
RESCORE_TOLERANCE = 0.02  # re-scored vs evaluation-stage metric: a larger gap means other data or truncation

# ----------------------------------------------------------------------------- 1. rank the evaluated variants


@dataclass
class Candidate:
    """One evaluated variant with its records; `reasons` says why it may not be promoted (empty: eligible)."""
    variant: str
    metric: float  # registry.metric from the eval record
    eval: EvalRecord
    train: Optional[TrainRecord]  # None: no train record (not eligible)
    audit: Optional[AuditRecord]
    reasons: list

    @property
    def eligible(self) -> bool:
        return not self.reasons

    @property
    def trainable_params(self) -> Optional[int]:
        return self.train.trainable_params if self.train else self.audit.trainable_params if self.audit else None

    @property
    def total_params(self) -> Optional[int]:
        return self.train.total_params if self.train else self.audit.total_params if self.audit else None

    @property
    def latency_p95_ms(self) -> Optional[float]:
        return self.eval.latency_ms.get("p95")

    def summary(self) -> dict:
        return {"variant": self.variant, "metric": self.metric, "trainable_params": self.trainable_params,
                "latency_p95_ms": self.latency_p95_ms, "eligible": self.eligible, "reasons": self.reasons}


def constraint_failures(reg: RegistryConfig, metric: float, trainable: Optional[int],
                        latency: Optional[float]) -> list[str]:
    """Why a variant with these figures may not be promoted (empty: it may)."""
    reasons = []
    if metrics.higher_is_better(reg.metric) and metric < reg.min_metric:
        reasons.append(f"{reg.metric} {metric:.4f} < min_metric {reg.min_metric}")
    if not metrics.higher_is_better(reg.metric) and reg.max_metric is not None and metric > reg.max_metric:
        reasons.append(f"{reg.metric} {metric:.4f} > max_metric {reg.max_metric}")
    if reg.max_trainable_params is not None and (trainable is None or trainable > reg.max_trainable_params):
        reasons.append(f"trainable params {trainable} > max_trainable_params {reg.max_trainable_params}")
    if reg.max_latency_ms is not None and (latency is None or latency > reg.max_latency_ms):
        reasons.append(f"p95 latency {latency} ms > max_latency_ms {reg.max_latency_ms}")
    return reasons


def read_candidate(reg: RegistryConfig, eval_path: Path, train_dir: Path, audit_dir: Path) -> Candidate:
    """The variant of one eval record (<variant>.json), with its train and audit records when present."""
    variant = eval_path.stem
    ev = read_variant_record(EvalRecord, eval_path, variant)
    train_path, audit_path = Path(train_dir) / eval_path.name, Path(audit_dir) / eval_path.name
    train = read_variant_record(TrainRecord, train_path, variant) if train_path.is_file() else None
    audit = read_variant_record(AuditRecord, audit_path, variant) if audit_path.is_file() else None
    cand = Candidate(variant, ev.metric(reg.metric), ev, train, audit, reasons=[])
    cand.reasons = constraint_failures(reg, cand.metric, cand.trainable_params, cand.latency_p95_ms)
    if train is None:
        cand.reasons.append(f"{train_path} not found")
    return cand


def rank_variants(reg: RegistryConfig, eval_dir: Path, train_dir: Path, audit_dir: Path) -> list[Candidate]:
    """Every evaluated variant, best first: best metric (highest; lowest for perplexity / bits per byte),
    ties to the fewest trainable params, then by name."""
    files = sorted(Path(eval_dir).glob("*.json"))
    if not files:
        raise DepthtuneError(f"no candidate metrics: {eval_dir}/*.json not found (run the evaluation stage first)")
    ranked = [read_candidate(reg, f, train_dir, audit_dir) for f in files]
    sign = 1 if metrics.higher_is_better(reg.metric) else -1
    ranked.sort(key=lambda c: (-sign * c.metric, c.trainable_params if c.trainable_params is not None else 1 << 62,
                               c.variant))
    return ranked


def unsettled_rivals(reg: RegistryConfig, cand: Candidate, ranked: list[Candidate]) -> list[str]:
    """The variants not converged (still rising when their budget ran out) that could close the gap to the
    candidate, each as `variant: why` (depthtune.evaluation.convergence.could_reach)."""
    out = []
    for c in ranked:
        if c is cand or c.train is None or not c.train.not_converged:
            continue
        why = rival_reach(c.metric, getattr(c.eval, f"{reg.metric}_ci", None), c.train.rise, c.train.horizon_steps,
                          cand.metric, reg.metric)
        if why:
            out.append(f"{c.variant}: {why}")
    return out


def no_candidate_reason(ranked: list[Candidate]) -> str:
    return "no variant passes the registry constraints: " + "; ".join(
        f"{c.variant}: {', '.join(c.reasons)}" for c in ranked)


# ----------------------------------------------------------------------------- 2. the store and the logged model


@dataclass(frozen=True)
class LoggedModel:
    """The candidate's model as its finetune stage logged it."""
    run_id: str
    model_uri: str
    run_tags: dict


def open_registry(tracking_cfg: TrackingConfig):
    """An MLflow client on the configured store, which must answer now (else DepthtuneError)."""
    try:
        client, _ = use_store(tracking_cfg)
        client.search_registered_models(max_results=1)
    except Exception as exc:  # noqa: BLE001
        where = safe_uri(tracking_uri(tracking_cfg))
        raise DepthtuneError(f"tracking store unreachable at {where}: {describe_error(exc)}") from None
    return client


def logged_model(client, cand: Candidate, where: str) -> LoggedModel:
    """The candidate's logged model, from the run recorded in its train record (`where`: the store, for messages)."""
    run_id = cand.train.run_id() if cand.train else None
    if not run_id:
        raise DepthtuneError(f"candidate {cand.variant}: no mlflow_run_id in its train record "
                             f"(tracking was off or down during finetune); re-run finetune@{cand.variant}")
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001
        raise DepthtuneError(f"candidate {cand.variant}: run {run_id} not found in {where} "
                             f"({describe_error(exc)})") from None
    model_uri = run.data.tags.get(TAG_MODEL_URI)
    if not model_uri:
        raise DepthtuneError(f"candidate {cand.variant}: run {run_id} has no logged model (tag {TAG_MODEL_URI})")
    return LoggedModel(run_id, model_uri, dict(run.data.tags))


# ----------------------------------------------------------------------------- 3. load back, 4. rescore


@dataclass(frozen=True)
class LabelledTexts:
    """The current test split: texts, their true label names, and the label names in id order."""
    texts: list
    gold: list
    names: list


def read_test_data(test_path: Path, labels_path: Path, task: str = "classification") -> LabelledTexts:
    """The prepared test split, every row checked (a bad row is a one-line DataError naming file and line).
    causal_lm: the texts only (no label names: the prepared data's one pseudo-class is not the model's)."""
    names = LabelSet.read(labels_path).names
    rows = read_prepared_split(test_path, len(names))  # refuses an empty split too
    if not tasks.get(task).labelled:
        return LabelledTexts([r.text for r in rows], [], [])
    return LabelledTexts([r.text for r in rows], [names[r.label] for r in rows], list(names))


def load_model(model_uri: str, what: str):
    """Load a logged/registered depthtune model back (pyfunc) -> serving.TextClassifier or TextGenerator."""
    import mlflow.pyfunc

    from depthtune.serving import TextClassifier, TextGenerator  # imports mlflow.pyfunc: only when loading

    try:
        loaded = mlflow.pyfunc.load_model(model_uri)
        inner = loaded.unwrap_python_model()
        if not isinstance(inner, (TextClassifier, TextGenerator)):
            raise TypeError(f"python model is {type(inner).__name__}, not a depthtune TextClassifier/TextGenerator")
        loaded.predict(["a smoke test"])  # through the signature, as a user would call it
    except Exception as exc:  # noqa: BLE001
        raise DepthtuneError(f"{what} fails to load back from {model_uri}: {describe_error(exc)}") from None
    return inner


def load_candidate(model_uri: str, variant: str, names: list, labels_path: Path):
    """The candidate's model, refused unless its labels are labels.json's, in the same order."""
    model = load_model(model_uri, f"candidate {variant}")
    if model.labels != names:
        raise DepthtuneError(f"candidate {variant} labels {model.labels} differ from {labels_path} {names}")
    return model


def alias_version(client, name: str, alias: str):
    """The model version an alias points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def load_champion(client, name: str, labels: list, variant: str):
    """(champion version, its model), or (None, None) without a champion; refused if its labels differ."""
    champ_mv = alias_version(client, name, CHAMPION)
    if champ_mv is None:
        return None, None
    champ = load_model(f"models:/{name}@{CHAMPION}", f"champion v{champ_mv.version}")
    if champ.labels != labels:
        raise DepthtuneError(f"label mapping differs from champion v{champ_mv.version}: {champ.labels} vs "
                             f"candidate {variant} {labels}; promote by hand after checking "
                             f"(mlflow: delete alias '{CHAMPION}' of {name})")
    return champ_mv, champ


def label_ids(names: list[str], predicted: list[str]) -> list[int]:
    ids = {n: i for i, n in enumerate(names)}
    return [ids[p] for p in predicted]


def score(predicted: list[str], gold: list[str], names: list[str]) -> dict:
    """{every label metric (macro-F1 over every label, absent ones 0, as the evaluation stage), n}."""
    refs, preds = label_ids(names, gold), label_ids(names, predicted)
    return {**{m.name: m.of_labels(refs, preds, len(names)) for m in metrics.label_metrics()}, "n": len(gold)}


def rescore(model, data: LabelledTexts):
    """({accuracy, macro_f1, n}, predicted label names) of a loaded classifier on the current test data;
    a language model's: ({perplexity, bits_per_byte, n}, its per-text {nll, tokens, n_bytes})."""
    if not data.names:  # a language model: every ratio metric of the per-text sums
        sums = model.score_texts(data.texts)
        return {**{m.name: m.of_sums(sum(sums["nll"]), sum(sums[m.denominator])) for m in metrics.ratio_metrics()},
                "n": len(data.texts)}, sums
    predicted = model.predict_names(data.texts)
    return score(predicted, data.gold, data.names), predicted


def paired_p_value(metric: str, data: LabelledTexts, cand_pred, champ_pred) -> float:
    """Two-sided p-value that candidate and champion differ in `metric` on the same texts
    (metrics.get(metric).paired_test: McNemar for accuracy, seeded paired bootstrap for macro-F1 and a language
    model's perplexity / bits per byte, over the per-text sums rescore() returned; both models' nll divided by the
    candidate's per-text counts)."""
    m = metrics.get(metric)
    if m.ratio is not None:
        return lm_paired_bootstrap(cand_pred["nll"], champ_pred["nll"], cand_pred[m.denominator], metric)
    return paired_test(label_ids(data.names, data.gold), label_ids(data.names, cand_pred),
                       label_ids(data.names, champ_pred), metric, num_labels=len(data.names))


def rescore_warning(metric: str, evaluated: float, rescored: float) -> str:
    return (f"candidate re-scored {metric} {rescored:.4f} differs from the evaluation stage's {evaluated:.4f} "
            "(different data or truncation?)")


# ----------------------------------------------------------------------------- 5. register


def model_card(cand: Candidate, rescored: dict, reg: RegistryConfig) -> str:
    """The version description: what the variant is, how it scored, what training cost (Markdown, < 5000 chars)."""
    au, ev, tr = cand.audit, cand.eval, cand.train
    arch = au.architecture if au else {}
    est = (au.estimates.get("memory_bytes") if au else None) or {}
    params = (f"- parameters: {cand.total_params:,} total, {cand.trainable_params:,} trainable "
              f"({100 * (au.trainable_fraction if au else 0):.2f}%), adapters {au.adapter_params if au else 0:,}"
              if cand.total_params and cand.trainable_params is not None else "- parameters: unknown")
    lines = [f"# {cand.variant}: {au.description if au else ''}", "",
             f"- depth: {arch.get('num_layers')} layers ({arch.get('model_type')}, hidden {arch.get('hidden_size')})",
             params,
             f"- {reg.metric}: {cand.metric:.4f} at evaluation (n={ev.n}); re-scored now "
             f"{rescored[reg.metric]:.4f} (n={rescored['n']})",
             f"- {', '.join(f'{k} {getattr(ev, k)}' for k in tasks.get(ev.task).metrics if k != reg.metric)}, "
             f"p95 latency {cand.latency_p95_ms} ms, throughput {ev.throughput_per_s}/s"]
    if tr is not None:
        lines += [f"- training: {tr.steps} steps, {tr.epochs_run} epochs, best val {tr.best_val}, "
                  f"{tr.train_time_s} s on {tr.device}",
                  f"- estimated train memory {est.get('total')} bytes; measured peak {tr.peak_memory_bytes} "
                  f"({tr.peak_memory_kind})"]
    lines += ["", "| layer | trainable | total |", "|---|---:|---:|"]
    lines += [f"| {r['name']} | {r['trainable']:,} | {r['total']:,} |" for r in (au.layers if au else [])]
    return "\n".join(lines)[:4900]


def version_tags(reg: RegistryConfig, cand: Candidate, logged: LoggedModel, labels: list, *, root: Path,
                 data_fp: Optional[str]) -> dict:
    """Tags of the registered version: what the variant is, how it scored, what produced it."""
    run_tags = logged.run_tags
    return {TAG_VARIANT: cand.variant, "depthtune.description": cand.audit.description if cand.audit else None,
            "depthtune.depth": cand.audit.architecture.get("num_layers") if cand.audit else None,
            "depthtune.trainable_params": cand.trainable_params, "depthtune.total_params": cand.total_params,
            f"depthtune.eval.{reg.metric}": cand.metric,
            **{f"depthtune.eval.{k}": cand.eval.metric(k) for k in tasks.get(cand.eval.task).metrics
               if k != reg.metric},
            "depthtune.task": cand.eval.task,
            "depthtune.latency_p95_ms": cand.latency_p95_ms,
            "depthtune.git_commit": run_tags.get("depthtune.git_commit") or git_commit(root),
            "depthtune.dvc_lock_hash": dvc_lock_hash(f"finetune@{cand.variant}", root)
            or run_tags.get("depthtune.inputs_fingerprint"),
            "depthtune.data_fingerprint": run_tags.get("depthtune.data_fingerprint") or data_fp,
            "depthtune.labels": json.dumps(labels), TAG_MODEL_URI: logged.model_uri,
            "depthtune.device": cand.train.device if cand.train else None}


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
                or (mv.tags or {}).get(TAG_MODEL_URI) == model_uri:
            return mv
    return None


def register_candidate(client, reg: RegistryConfig, cand: Candidate, logged: LoggedModel, labels: list,
                       rescored: dict, *, root: Path, data_fp: Optional[str]) -> tuple[str, bool]:
    """(version, newly registered): the candidate's logged model as a version of reg.model_name, once."""
    import mlflow
    from mlflow.exceptions import MlflowException

    name = reg.model_name
    mv, created = _find_version(client, name, logged.run_id, logged.model_uri), False
    if mv is None:
        try:
            client.create_registered_model(name, description="depthtune text classifier; aliases: champion, "
                                           "challenger", tags={"depthtune": "true"})
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "already exists" not in str(exc):
                raise
        tags = version_tags(reg, cand, logged, labels, root=root, data_fp=data_fp)
        mv = mlflow.register_model(logged.model_uri, name, tags={k: str(v) for k, v in tags.items() if v is not None})
        client.update_model_version(name, mv.version, description=model_card(cand, rescored, reg))
        created = True
    version = str(mv.version)
    client.set_model_version_tag(name, version, f"depthtune.rescored.{reg.metric}", f"{rescored[reg.metric]:.6f}")
    return version, created


# ----------------------------------------------------------------------------- 6. decide, 7. move the aliases


def _fmt_p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def decide(reg: RegistryConfig, candidate_version: str, candidate_score: float, champion_version: Optional[str],
           champion_score: Optional[float], p_value: Optional[float] = None) -> tuple[str, str]:
    """(decision, reason) from scores on the same test data; decision is promoted, unchanged or challenger.

    No champion yet -> promoted. The candidate IS the champion -> unchanged. Otherwise promoted
    iff the candidate is better, significantly so (`p_value` of the paired test < alpha) AND by
    at least min_delta. A tie is never significant: the champion stays.
    """
    m = reg.metric
    if champion_version is None:
        floor = (f">= min_metric {reg.min_metric}" if metrics.higher_is_better(m) else
                 f"<= max_metric {reg.max_metric}" if reg.max_metric is not None else "(no max_metric)")
        return "promoted", f"first champion: {m} {candidate_score:.4f} {floor}"
    if champion_version == candidate_version:
        return "unchanged", (f"v{candidate_version} is already the champion "
                             f"({m} {candidate_score:.4f} on the current test data)")
    if p_value is None:
        raise ValueError("decide: a candidate against a champion needs the paired test's p_value")
    gain = (candidate_score - champion_score) * (1 if metrics.higher_is_better(m) else -1)  # > 0: the candidate is better
    versus = (f"{m} {candidate_score:.4f} vs champion v{champion_version} {champion_score:.4f} "
              f"re-scored on the current test data: {gain:+.4f}, {metrics.get(m).paired_test} {_fmt_p(p_value)}")
    significant = gain > 0 and p_value < reg.alpha
    if significant and gain >= reg.min_delta:
        return "promoted", (f"{versus}: significantly better at alpha {reg.alpha}, "
                            f"+{gain:.4f} >= min_delta {reg.min_delta}")
    if gain <= 0:
        why = ["not better"]
    else:
        why = [] if significant else [f"not significantly better (p >= alpha {reg.alpha})"]
        why += [f"+{gain:.4f} < min_delta {reg.min_delta}"] if gain < reg.min_delta else []
    return "challenger", f"{versus}: " + "; ".join(why)


def recheck_champion(client, name: str, champion_version: Optional[str]) -> None:
    """Refuse if the champion moved since it was loaded (another machine promoted meanwhile)."""
    now = alias_version(client, name, CHAMPION)
    if (str(now.version) if now else None) != champion_version:
        raise DepthtuneError(f"champion of {name} changed during promotion (now v{now.version if now else None}); "
                             "run promote again")


def move_aliases(client, name: str, version: str, decision: str, reason: str,
                 champion_version: Optional[str]) -> dict:
    """Apply the decision to the registry; returns {champion: version, challenger: version} afterwards."""
    if decision == "promoted":
        client.set_registered_model_alias(name, CHAMPION, version)  # THE switch
        challenger = alias_version(client, name, CHALLENGER)
        if challenger is not None and str(challenger.version) == version:
            client.delete_registered_model_alias(name, CHALLENGER)
        if champion_version is not None:
            client.set_model_version_tag(name, champion_version, "depthtune.replaced_by", version)
    elif decision == "challenger":
        client.set_registered_model_alias(name, CHALLENGER, version)
    # the decision that set the alias stays readable; a later no-op check goes to its own tag
    tag = "depthtune.last_check" if decision == "unchanged" else "depthtune.promotion"
    client.set_model_version_tag(name, version, tag, f"{decision}: {reason}")
    champ, chall = alias_version(client, name, CHAMPION), alias_version(client, name, CHALLENGER)
    return {CHAMPION: champ and str(champ.version), CHALLENGER: chall and str(chall.version)}


# ----------------------------------------------------------------------------- promote: the steps in order


class _Clock:
    """Seconds per step (`with clock("register"): ...`) for the report's timings_s."""

    def __init__(self):
        self.start, self.seconds = time.perf_counter(), {}

    @contextlib.contextmanager
    def __call__(self, step: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] = time.perf_counter() - t

    def rounded(self) -> dict:
        return {k: round(v, 3) for k, v in {**self.seconds, "total": time.perf_counter() - self.start}.items()}


def score_against_champion(reg: RegistryConfig, client, cand, model, data: LabelledTexts, clock: _Clock,
                           report: dict) -> tuple:
    """Re-score the candidate and the current champion on the same test texts, and their paired test:
    (candidate's scores, champion's version or None, champion's scores or None, p-value or None)."""
    with clock("load_champion"):
        champ_mv, champ = load_champion(client, reg.model_name, model.labels, cand.variant)
    champ_version = str(champ_mv.version) if champ_mv else None
    with clock("score_candidate"):
        cand_score, cand_pred = rescore(model, data)
    report["candidate"]["rescored"] = cand_score
    champ_score = p_value = None
    if champ is not None:
        with clock("score_champion"):
            champ_score, champ_pred = rescore(champ, data)
        p_value = paired_p_value(reg.metric, data, cand_pred, champ_pred)  # the same texts, paired
        report["champion_before"] = {"version": champ_version, "variant": (champ_mv.tags or {}).get(TAG_VARIANT),
                                     "rescored": champ_score}
        report["paired_test"] = {"test": metrics.get(reg.metric).paired_test, "p_value": p_value, "alpha": reg.alpha}
    scale = 1.0 if metrics.higher_is_better(reg.metric) else abs(cand.metric)  # perplexity: a relative tolerance
    if abs(cand_score[reg.metric] - cand.metric) > RESCORE_TOLERANCE * scale:  # other data or truncation?
        report["warning"] = rescore_warning(reg.metric, cand.metric, cand_score[reg.metric])
    return cand_score, champ_version, champ_score, p_value


def promote(reg: RegistryConfig, tracking_cfg: TrackingConfig, *, root: str | Path = ".",
            eval_dir: str | Path = layout.EVAL_METRICS, train_dir: str | Path = layout.TRAIN_METRICS,
            audit_dir: str | Path = layout.AUDIT, test_path: str | Path = layout.prepared_split("test"),
            labels_path: str | Path = layout.LABELS, lock_timeout_s: float = 600.0) -> dict:
    """Pick, register and (maybe) promote the best variant; returns the promotion report (the stage writes it).

    Relative paths are under `root`. Raises DepthtuneError, with the registry untouched, on a refusal.
    """
    root, clock = Path(root), _Clock()
    report: dict = {"schema": SCHEMA, "model_name": reg.model_name, "metric": reg.metric,
                    "min_delta": reg.min_delta, "alpha": reg.alpha, "min_metric": reg.min_metric, **provenance(root)}

    def done(decision: str, reason: str) -> dict:
        return {**report, "decision": decision, "reason": reason, "timings_s": clock.rounded()}

    if not tracking_cfg.enabled:
        return done("skipped", "tracking.enabled is false: the registry lives in the MLflow store")
    ranked = rank_variants(reg, root / eval_dir, root / train_dir, root / audit_dir)
    report["variants"] = [c.summary() for c in ranked]
    eligible = [c for c in ranked if c.eligible]
    if not eligible:
        return done("no_candidate", no_candidate_reason(ranked))
    cand = eligible[0]
    report["candidate"] = {"variant": cand.variant, "eval_metric": cand.metric, "trainable_params": cand.trainable_params,
                           "total_params": cand.total_params, "latency_p95_ms": cand.latency_p95_ms}
    report["unsettled"] = unsettled = unsettled_rivals(reg, cand, ranked)
    if unsettled and not reg.promote_unsettled:
        return done("held", f"{cand.variant} is ahead, but not converged and could close the gap: "
                            f"{'; '.join(unsettled)} (registry untouched; registry.promote_unsettled: true promotes "
                            "anyway, or train them longer: train.convergence.max_epochs)")

    uri = tracking_uri(tracking_cfg)
    report["tracking_uri"] = safe_uri(uri)
    client = open_registry(tracking_cfg)  # the store must answer before anything else happens
    logged = logged_model(client, cand, report["tracking_uri"])
    report["candidate"].update(run_id=logged.run_id, model_uri=logged.model_uri)
    task = cand.eval.task
    data, data_fp = read_test_data(root / test_path, root / labels_path, task), data_fingerprint(root)
    report["test_data"] = {"path": str(test_path), "n": len(data.texts), "labels": data.names, "fingerprint": data_fp}

    with exclusive(client, uri, f"promote-{reg.model_name}", lock_timeout_s):
        with clock("load_candidate"):
            model = load_candidate(logged.model_uri, cand.variant, data.names, Path(labels_path))
        cand_score, champ_version, champ_score, p_value = score_against_champion(reg, client, cand, model, data,
                                                                                 clock, report)
        with clock("register"):
            version, created = register_candidate(client, reg, cand, logged, model.labels, cand_score, root=root,
                                                  data_fp=data_fp)
        report["candidate"].update(version=version, newly_registered=created)
        recheck_champion(client, reg.model_name, champ_version)
        decision, reason = decide(reg, version, cand_score[reg.metric], champ_version,
                                  champ_score[reg.metric] if champ_score else None, p_value)
        with clock("alias"):
            report["aliases_after"] = move_aliases(client, reg.model_name, version, decision, reason, champ_version)
    return done(decision, reason)


def summary_lines(report: dict) -> list[str]:
    """What a promotion read, decided and why, for the stage log."""
    lines = []
    ranked = report.get("variants") or []
    cand = report.get("candidate") or {}
    if ranked:
        lines.append(f"promote: {len(ranked)} variants evaluated, {sum(r['eligible'] for r in ranked)} eligible; "
                     f"candidate {cand.get('variant', '-')}")
    if cand.get("rescored"):
        champ = report.get("champion_before")
        test = report.get("paired_test") or {}
        vs = (f" vs champion v{champ['version']} ({champ['variant']}) {champ['rescored'][report['metric']]:.4f}, "
              f"{test.get('test')} p={test.get('p_value', float('nan')):.3g}" if champ else " (no champion yet)")
        lines.append(f"promote: re-scored {report['metric']} {cand['rescored'][report['metric']]:.4f} on "
                     f"{cand['rescored']['n']} test texts{vs}")
    if report.get("warning"):
        lines.append(f"warning: {report['warning']}")
    where = f" v{cand['version']}" if cand.get("version") else ""
    lines.append(f"promote: {report['decision']}{where} ({cand.get('variant', '-')}): {report['reason']}")
    return lines


def registry_state(tracking_cfg: TrackingConfig, model_name: str) -> dict:
    """{versions: [{version, variant, promotion, aliases}], champion, challenger} for reports and tests."""
    client, _ = use_store(tracking_cfg)
    rm = client.get_registered_model(model_name)
    aliases = {a: str(v) for a, v in (rm.aliases or {}).items()}
    versions = sorted(client.search_model_versions(f"name = '{model_name}'"), key=lambda v: int(v.version))
    return {"champion": aliases.get(CHAMPION), "challenger": aliases.get(CHALLENGER),
            "versions": [{"version": str(v.version), "variant": (v.tags or {}).get(TAG_VARIANT),
                          "promotion": (v.tags or {}).get("depthtune.promotion"),
                          "aliases": [a for a, ver in aliases.items() if str(ver) == str(v.version)]}
                         for v in versions]}
