"""The comparison report: one table with 95% intervals, paired tests against the best, two
Pareto fronts, a verdict that calls a winner only when the data says so, plots.

Pure functions over the per-variant records (depthtune/records.py, docs/results.md):
AuditRecord `audit/<v>.json`, TrainRecord `metrics/train/<v>.json`, EvalRecord
`metrics/eval/<v>.json` (which carries each variant's test predictions and intervals).
No model is loaded; the paired tests run on the stored predictions (depthtune/evaluation/significance.py).
This module imports neither torch nor the orchestrator.

    results = load_results(variants, audit_dir=..., train_dir=..., eval_dir=...)  # [VariantResults]
    report = build_report(results, metric="accuracy", tolerance=0.01, alpha=0.05)
    outputs = depthtune.report.text.render_outputs(report)   # {file name: bytes}, written by stages/compare.py

Outputs (names relative to the report folder):
- `comparison.md`   header, verdict, table (intervals, p vs best, Pareto members, not-converged
                    marks and notes), fronts, per-layer table
- `comparison.json` schema `depthtune.compare/2`: `metric`, `tolerance`, `alpha`, `variants`
                    (flat, for `dvc metrics`: metrics, `<metric>_ci_low/high`, `p_vs_best`),
                    `best`, `cheapest`, `verdict`, and as lists (which `dvc metrics show` skips)
                    `rows`, `layers`; `pareto` (name lists)
- `variants.csv`    variant,depth,trainable_params,accuracy,accuracy_ci_low,accuracy_ci_high,macro_f1,
                    train_time_s (`dvc plots`)
- `pareto.png`      accuracy (with 95% intervals) vs trainable params (log x) and vs train time
- `depth.png`       heatmap of trainable params per layer bucket per variant (log colour)
- `index.html`      all of it on one self-contained page (figures inlined; opens offline: depthtune.report.page)
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from depthtune import tasks
from depthtune.evaluation import metrics
from depthtune import layout
from depthtune.config import parse_variant
from depthtune.evaluation.class_summary import class_section
from depthtune.errors import DepthtuneError
from depthtune.model.layer_order import ordered_layer_names
from depthtune.records import AuditRecord, EvalRecord, TrainRecord, read_variant_record
from depthtune.evaluation.convergence import rival_reach
from depthtune.evaluation.significance import compare_to_best, lm_paired_bootstrap

SCHEMA = "depthtune.compare/2"
FRONT_PARAMS = "accuracy_vs_trainable_params"  # classification's fronts; a causal LM's: perplexity_vs_...
FRONT_TIME = "accuracy_vs_train_time"
NOT_CONVERGED = "⚠"  # marks a variant still rising when its budget ran out (evaluation.convergence)
_EPS = 1e-12  # float slack for "within tolerance" and ties


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class VariantResults:
    """The three records one variant's stages wrote, and where they were read from."""
    variant: str
    audit: AuditRecord
    train: TrainRecord
    eval: EvalRecord
    paths: dict  # {"audit" | "train" | "eval": Path}


def result_paths(variant: str, *, audit_dir: str | Path, train_dir: str | Path,
                 eval_dir: str | Path) -> dict[str, Path]:
    """A variant's record files: the layout's file names, in the folders the stage was given."""
    return {"audit": Path(audit_dir) / Path(layout.audit_record(variant)).name,
            "train": Path(train_dir) / Path(layout.train_record(variant)).name,
            "eval": Path(eval_dir) / Path(layout.eval_record(variant)).name}


RECORD_OF = {"audit": AuditRecord, "train": TrainRecord, "eval": EvalRecord}
STAGE_OF = {"audit": "audit", "train": "finetune@{v}", "eval": "evaluation@{v}"}  # the DVC stage that writes it


def load_results(variants: Sequence[str], *, audit_dir: str | Path, train_dir: str | Path,
                 eval_dir: str | Path) -> list[VariantResults]:
    """Every variant's records, in `variants` order (the params order).

    Every missing file of every variant is named in one DepthtuneError, with the DVC stage
    that writes it; a malformed or stale record is a one-line error naming file and key.
    """
    if not variants:
        raise DepthtuneError("compare: no variants to compare (params.yaml `variants` is empty)")
    dirs = {"audit_dir": audit_dir, "train_dir": train_dir, "eval_dir": eval_dir}
    missing = [f"{p} (written by stage {STAGE_OF[kind].format(v=v)})"
               for v in variants for kind, p in result_paths(v, **dirs).items() if not p.is_file()]
    if missing:
        raise DepthtuneError("compare: missing result file" + ("s" if len(missing) > 1 else "") + ": "
                             + "; ".join(missing))
    out = []
    for v in variants:
        paths = result_paths(v, **dirs)
        recs = {kind: read_variant_record(RECORD_OF[kind], p, v) for kind, p in paths.items()}
        out.append(VariantResults(variant=v, paths=paths, **recs))
    return out


# ----------------------------------------------------------------------------- rows


def _optional_number(value, path: Path, key: str) -> float | None:
    """A number a record may lack (None); anything else than a finite number is an error."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DepthtuneError(f"{path}: `{key}` is {value!r:.80}, expected a number")
    return value if math.isfinite(value) else None


def _audit_memory_estimate(res: VariantResults) -> int:
    try:
        return res.audit.memory_estimate()
    except (KeyError, TypeError, ValueError):
        raise DepthtuneError(f"{res.paths['audit']}: missing `estimates.memory_bytes.total` "
                             "(rerun the audit stage)") from None


def build_row(res: VariantResults) -> dict:
    """One table row from a variant's three records."""
    a, t, e = res.audit, res.train, res.eval
    if t.trainable_params != a.trainable_params:
        raise DepthtuneError(f"{res.paths['train']}: trainable_params {t.trainable_params:,} != "
                             f"{a.trainable_params:,} in {res.paths['audit']} "
                             "(stale results: rerun the audit and finetune stages for this variant)")
    est = t.estimated_memory_bytes if t.estimated_memory_bytes is not None else _audit_memory_estimate(res)
    peak = t.peak_memory_bytes or None  # 0: not measured
    ratio = peak / est if (peak and est) else _optional_number(t.memory_ratio, res.paths["train"], "memory_ratio")
    return {
        "variant": res.variant,
        "description": a.description,
        "init": "pretrained" if starts_pretrained(a) else "scratch",
        "depth": t.depth,
        "trainable_params": a.trainable_params,
        "total_params": a.total_params,
        "trainable_pct": 100.0 * a.trainable_params / a.total_params if a.total_params else 0.0,
        "estimated_memory_bytes": est,
        "peak_memory_bytes": peak,
        "peak_memory_kind": t.peak_memory_kind,
        "memory_ratio": ratio,
        "peak_reserved_bytes": t.peak_reserved_bytes or None,
        **time_columns(t.time_prediction or {}),
        "train_time_s": float(t.train_time_s),
        "samples_per_s": t.samples_per_s,
        "task": e.task,
        **{k: v for m in tasks.get(e.task).metrics for k, v in ((m, e.metric(m)), (f"{m}_ci", list(e.interval(m))))},
        "n_test": e.n,
        "p_vs_best": None,  # filled by build_report: the paired test against the best variant
        "not_converged": bool(t.not_converged),
        "convergence": t.convergence or ("still rising" if t.not_converged else
                                         "early stopping" if t.stopped_early else "plateau"),
        "rise": t.rise,
        "near_chance": bool(t.near_chance),
        "chance": t.chance,
        "extensions": t.extensions,
        "budget_epochs": t.budget_epochs or (t.config or {}).get("epochs"),
        "horizon_steps": t.horizon_steps,
        "convergence_note": t.convergence_note,
        "head_lr": (t.config or {}).get("head_lr"),
        "lr": (t.config or {}).get("lr"),
        "lr_searched": bool(t.lr_search),
        "lr_at_edge": bool((t.lr_search or {}).get("at_edge")),
        "epochs_run": t.epochs_run,
        "best_epoch": t.best_epoch,
        "stopped_early": bool(t.stopped_early),
        **seed_spread(e.seed_scores, res.paths["eval"], tasks.get(e.task).metrics[0]),
        "latency_p50_ms": _optional_number(e.latency_ms.get("p50"), res.paths["eval"], "latency_ms.p50"),
        "latency_p95_ms": _optional_number(e.latency_ms.get("p95"), res.paths["eval"], "latency_ms.p95"),
    }


def seed_spread(scores: list, path, metric: str = "accuracy") -> dict:
    """train.seeds > 1: `metric` (accuracy; a causal LM's perplexity) over the seeds' models on the same test
    texts (mean, sd, min, max), as `seed_<metric>`."""
    accs = [s.get(metric) for s in scores]
    if len(accs) < 2:
        return {"seeds": len(accs) or 1, f"seed_{metric}": None}
    if not all(isinstance(a, (int, float)) for a in accs):
        raise DepthtuneError(f"{path}: seed_scores has an entry without a numeric {metric} (re-run the evaluation)")
    return {"seeds": len(accs), f"seed_{metric}": {"mean": statistics.mean(accs), "sd": statistics.stdev(accs),
                                                   "min": min(accs), "max": max(accs)}}


# ----------------------------------------------------------------------------- pareto & verdict


def pareto_front(points: Iterable[tuple[str, float, float]]) -> list[str]:
    """Names of the non-dominated points among (name, value, cost): value up, cost down.

    A point is dominated when another has value >= and cost <= with at least one
    strict. Exact duplicates dominate neither each other: both stay. Returned
    in increasing cost (then decreasing value, then input order).
    """
    pts = list(points)
    front = []
    for i, (n, val, cost) in enumerate(pts):
        dominated = any(v2 >= val and c2 <= cost and (v2 > val or c2 < cost)
                        for j, (_, v2, c2) in enumerate(pts) if j != i)
        if not dominated:
            front.append((cost, -val, i, n))
    return [n for *_, n in sorted(front)]


def starts_pretrained(audit: AuditRecord) -> bool:
    """Whether the variant's kind starts from the base model's weights (the audit record's spec, as params.yaml
    writes it, read back through the kind registry: `init: scratch` is the scratch kind)."""
    spec = parse_variant(audit.variant, {k: v for k, v in (audit.spec or {}).items() if v is not None}, "audit.spec")
    return spec.method.pretrained


def quality_metric(rows: Sequence[dict]) -> str:
    """What the Pareto fronts and plots trade against cost: the task's headline metric (depthtune.tasks: the first of
    its `metrics`; accuracy for classification, perplexity for causal_lm)."""
    return tasks.get(rows[0].get("task", "classification") if rows else "classification").metrics[0]


def front_names(quality: str) -> tuple[str, str]:
    """The two fronts' keys: FRONT_PARAMS and FRONT_TIME for a classification report."""
    return f"{quality}_vs_trainable_params", f"{quality}_vs_train_time"


def pareto_fronts(rows: Sequence[dict]) -> dict[str, list[str]]:
    """Both fronts; the value goes up (a lower-is-better metric is negated)."""
    q = quality_metric(rows)
    sign = metrics.get(q).sign
    params_front, time_front = front_names(q)
    return {params_front: pareto_front((r["variant"], sign * r[q], r["trainable_params"]) for r in rows),
            time_front: pareto_front((r["variant"], sign * r[q], r["train_time_s"]) for r in rows)}


def fmt_metric(x: float) -> str:
    return f"{x:.4f}"


def fmt_ci(ci: Sequence[float]) -> str:
    return f"{ci[0]:.3f}-{ci[1]:.3f}"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}" if p < 0.01 else f"{p:.2f}"


def metric_label(metric: str) -> str:
    return metrics.get(metric).display


def metric_sign(metric: str) -> int:
    """+1 when higher is better, -1 when lower is (perplexity, bits per byte): `sign * value` goes up."""
    return metrics.get(metric).sign


def pick_best(rows: Sequence[dict], metric: str = "accuracy") -> dict:
    """The row with the best `metric`, the highest (the lowest for perplexity, bits per byte)
    (ties: fewer trainable params, then params order)."""
    if metric not in metrics.NAMES:
        raise DepthtuneError(f"evaluation.metric: {metric!r} is not one of {', '.join(metrics.NAMES)}")
    if not rows:
        raise DepthtuneError("compare: no variants to compare")
    order = {r["variant"]: i for i, r in enumerate(rows)}
    if metric not in rows[0]:
        raise DepthtuneError(f"evaluation.metric: {metric} is not a metric of these {rows[0].get('task')} results")
    return min(rows, key=lambda r: (-metric_sign(metric) * r[metric], r["trainable_params"], order[r["variant"]]))


def paired_p_values(results: Sequence[VariantResults], metric: str, best: str) -> dict[str, float]:
    """{variant: p-value of the paired test (McNemar / paired bootstrap) against `best`}; 1.0 for `best`.

    Pairs the stored test predictions text by text, so every variant must have been scored
    on the same test texts (same references, same order).
    """
    ref = next(r for r in results if r.variant == best)
    if tasks.get(ref.eval.task).per_position:
        return lm_p_values(results, metric, ref)
    for r in results:
        if r.eval.references != ref.eval.references:
            raise DepthtuneError(f"{r.paths['eval']}: scored on other test texts than {ref.paths['eval']} "
                                 "(re-run the evaluation stages on the current data)")
    p = compare_to_best(ref.eval.references, {r.variant: r.eval.predictions for r in results}, metric, best,
                        num_labels=len(ref.eval.labels))
    return {v: 1.0 if x is None else x for v, x in p.items()}


def lm_p_values(results: Sequence[VariantResults], metric: str, ref: VariantResults) -> dict[str, float]:
    """Causal LMs: the paired bootstrap over test texts of each variant's perplexity / bits per byte vs `ref`'s
    (the same texts: same predicted tokens and bytes per text)."""
    for r in results:
        if r.eval.tokens != ref.eval.tokens or r.eval.n_bytes != ref.eval.n_bytes:
            raise DepthtuneError(f"{r.paths['eval']}: scored on other test texts than {ref.paths['eval']} "
                                 "(re-run the evaluation stages on the current data)")
    denominator = getattr(ref.eval, metrics.get(metric).denominator)  # tokens (perplexity) or bytes per text
    return {r.variant: 1.0 if r is ref else lm_paired_bootstrap(ref.eval.nll, r.eval.nll, denominator, metric)
            for r in results}


def _within(r: dict, best: dict, metric: str, tolerance: float, alpha: float) -> bool:
    """The "within tolerance" rule: r's 95% interval reaches best - tolerance (best + tolerance when lower
    is better) AND r is not significantly worse than the best (p >= alpha). The best itself always qualifies."""
    if r is best:
        return True
    if metrics.higher_is_better(metric):
        reaches = r[f"{metric}_ci"][1] >= best[metric] - tolerance - _EPS
    else:
        reaches = r[f"{metric}_ci"][0] <= best[metric] + tolerance + _EPS
    return reaches and (r["p_vs_best"] is None or r["p_vs_best"] >= alpha)


def best_and_cheapest(rows: Sequence[dict], metric: str = "accuracy", tolerance: float = 0.01,
                      alpha: float = 0.05) -> dict:
    """The verdict over rows that carry `<metric>_ci` and `p_vs_best` (see build_report).

    Best: the highest point estimate (pick_best). It is *named* the best only when its paired
    test against every other variant has p < alpha; otherwise the sentence lists the variants
    statistically indistinguishable from it (p >= alpha), with their p-values.
    Cheapest: the fewest trainable params (ties: higher metric, then params order) among the
    variants within tolerance by the interval rule of `_within`: upper bound of the 95% interval
    >= best - tolerance, and not significantly worse than the best at alpha.
    """
    best = pick_best(rows, metric)
    order = {r["variant"]: i for i, r in enumerate(rows)}
    others = [r for r in rows if r is not best]
    tied = [r for r in others if r["p_vs_best"] is None or r["p_vs_best"] >= alpha]
    within = [r for r in rows if _within(r, best, metric, tolerance, alpha)]
    cheap = min(within, key=lambda r: (r["trainable_params"], -metric_sign(metric) * r[metric], order[r["variant"]]))
    verdict = {
        "metric": metric, "tolerance": tolerance, "alpha": alpha, "test": metrics.get(metric).paired_test,
        "n_test": best.get("n_test"),
        "best": {"variant": best["variant"], metric: best[metric], "trainable_params": best["trainable_params"]},
        "significant": not tied,  # the best is significantly better than every other variant
        "indistinguishable": [r["variant"] for r in tied],
        "cheapest": {"variant": cheap["variant"], metric: cheap[metric],
                     "trainable_params": cheap["trainable_params"],
                     "gap": round(metric_sign(metric) * (best[metric] - cheap[metric]), 12)},
    }
    unsettled = unsettled_rivals(best, others, metric)
    if unsettled:
        verdict["significant"] = False  # a rival that could close the gap was cut short: no crown
    verdict["unsettled"] = [{"variant": r["variant"], "reason": why} for r, why in unsettled]
    verdict["near_chance"] = [r["variant"] for r in rows if r.get("near_chance")]
    verdict["sentence"] = verdict_sentence(verdict, best, cheap, others, tied)
    seeds = seed_verdict(rows, metric, best)
    if seeds is not None:
        verdict["seeds"] = seeds
        verdict["sentence"] += " " + seeds["sentence"]
    return verdict


def unsettled_rivals(best: dict, others: Sequence[dict], metric: str) -> list[tuple[dict, str]]:
    """The variants that are not converged and could close the gap to the best, each with why."""
    out = []
    for r in others:
        if r.get("not_converged"):
            why = rival_reach(r[metric], r.get(f"{metric}_ci"), r.get("rise"), r.get("horizon_steps") or 0,
                              best[metric], metric)
            if why:
                out.append((r, why))
    return out


def seed_verdict(rows: Sequence[dict], metric: str, best: dict) -> dict | None:
    """train.seeds > 1: does the verdict above (the first seed's models) hold across seeds?

    Ranks the variants trained with several seeds by their mean over the seeds (`seed_<metric>`, or the
    task's first metric when the selection metric has no per-seed score) and sets the leader's lead over the
    runner-up against the larger of their two seed-to-seed standard deviations: a lead below it means the
    seeds do not separate the two, whatever the first seed's paired test said. None without seeded rows.
    """
    # seed_spread scores the seeds by the task's first metric: the selection metric's own when it is that one
    keys = [f"seed_{metric}"] + [f"seed_{t.metrics[0]}" for t in tasks.every()]
    key = next((k for k in keys if any(r.get(k) for r in rows)), None)
    seeded = [r for r in rows if key and r.get(key) and r.get("seeds", 1) > 1]
    if not seeded:
        return None
    m = key[len("seed_"):]
    sign = metric_sign(m)
    ranked = sorted(seeded, key=lambda r: -sign * r[key]["mean"])
    top = ranked[0]

    def spread(r: dict) -> str:
        return f"{r['variant']}'s {fmt_metric(r[key]['mean'])} ± {fmt_metric(r[key]['sd'])}"

    out = {"metric": m, "by_mean": [r["variant"] for r in ranked], "lead": None, "separated": None}
    # train.seeds is one setting for every variant: one count
    text = f"Across seeds ({top['seeds']} each, mean ± sd of {metric_label(m)}): the highest mean is {spread(top)}"
    if len(ranked) > 1:
        nxt = ranked[1]
        lead = sign * (top[key]["mean"] - nxt[key]["mean"])
        sd = max(top[key]["sd"], nxt[key]["sd"])
        out.update(lead=round(lead, 12), separated=lead > sd)
        text += (f", {lead:.4f} ahead of {spread(nxt)}: "
                 + ("more than either's seed-to-seed sd." if lead > sd else
                    f"less than their seed-to-seed sd ({sd:.4f}), so the seeds do not separate the two."))
    else:
        text += " (the only variant trained with several seeds)."
    if best["variant"] not in out["by_mean"][:2] and best.get(key):  # neither of the two named above
        text += f" The first seed's best, {best['variant']}, averages {fmt_metric(best[key]['mean'])}."
    out["sentence"] = text
    return out


def verdict_sentence(v: dict, best: dict, cheap: dict, others: list, tied: list) -> str:
    """The report's verdict in words (see best_and_cheapest)."""
    m, alpha, tol, test = v["metric"], v["alpha"], v["tolerance"], v["test"]
    edge = best[m] - metric_sign(m) * tol  # the worst score still "within tolerance" of the best
    on = f"at alpha {alpha:g} on {v['n_test']:,} test texts" if v.get("n_test") else f"at alpha {alpha:g}"
    head = f"{fmt_metric(best[m])}, 95% CI {fmt_ci(best[f'{m}_ci'])}"
    if not others:
        sentence = f"Only variant: **{best['variant']}** ({metric_label(m)} {head}). "
    elif v.get("unsettled"):
        names = "; ".join(f"{u['variant']} ({u['reason']})" for u in v["unsettled"])
        verb = "is" if len(v["unsettled"]) == 1 else "are"
        sentence = (f"Not settled: {best['variant']} has the {'highest' if metric_sign(m) > 0 else 'lowest'} "
                    f"{metric_label(m)} ({head}), but {names} {verb} not converged and could close the gap, so no "
                    f"variant is called significantly better (raise train.convergence.max_epochs, or their lr). ")
    elif not tied:
        worst = max(r["p_vs_best"] for r in others)
        every = "every p < 0.001" if worst < 0.001 else f"every p ≤ {fmt_p(worst)}"
        sentence = (f"Best by {metric_label(m)}: **{best['variant']}** ({head}, {best['trainable_params']:,} trainable "
                    f"params), significantly better than every other variant {on} ({test}, {every}). ")
    else:
        names = ", ".join(f"{r['variant']} (p={fmt_p(r['p_vs_best'])})" for r in tied)
        verb = "is" if len(tied) == 1 else "are"
        sentence = (f"No clear best: {best['variant']} has the {'highest' if metric_sign(m) > 0 else 'lowest'} "
                    f"{metric_label(m)} ({head}), but {names} {verb} "
                    f"statistically indistinguishable from it {on} ({test} test). ")
    if v.get("near_chance"):
        sentence += (f"{', '.join(v['near_chance'])} stayed near chance on validation: a failed run (its lr or "
                     "budget), not the method's result. ")
    if cheap is best:
        return sentence + (f"No variant with fewer trainable params is within {tol:g} of it (95% interval "
                           f"reaching {fmt_metric(edge)}, not significantly worse).")
    factor = best["trainable_params"] / cheap["trainable_params"] if cheap["trainable_params"] else math.inf
    return sentence + (f"Cheapest within {tol:g} of it: **{cheap['variant']}** ({fmt_metric(cheap[m])}, "
                       f"95% CI {fmt_ci(cheap[f'{m}_ci'])} reaching {fmt_metric(edge)}, "
                       f"{metric_sign(m) * (best[m] - cheap[m]):.4f} behind, not significantly worse: "
                       f"p={fmt_p(cheap['p_vs_best'])}, {cheap['trainable_params']:,} trainable params, "
                       f"{'all frozen' if math.isinf(factor) else f'{factor:,.1f}x fewer'}).")


def stopped_by(r: dict) -> str:
    """What ended a run: early stopping, or its budget (train.epochs, plus the extensions a rising run got)."""
    if r.get("stopped_early"):
        return "early stopping"
    ext = r.get("extensions") or 0
    return (f"budget: {r.get('budget_epochs') or '?'} epochs" +
            (f" ({ext} extension{'s' if ext > 1 else ''})" if ext else ""))


def converged_by(r: dict, bold: bool = False) -> str:
    """Converged, by which rule (evaluation.convergence), with the plateau test's figures; the near-chance flag."""
    rise, how = r.get("rise"), r.get("convergence")
    figures = "" if rise is None else (f"{rise['before']:.4f} -> {rise['within']:.4f} over the last {rise['window']} "
                                       f"validations, p{'' if fmt_p(rise['p']).startswith('<') else '='}{fmt_p(rise['p'])}")
    if r["not_converged"]:
        text = (f"{'**no**' if bold else 'no'} {NOT_CONVERGED}: still rising"
                + (f" ({figures})" if figures else " (too few validations to show a plateau)"))
    elif how == "plateau":
        text = f"yes: plateau ({figures})" if figures else "yes: plateau"
    else:
        text = f"yes: {how}"
    return text + ("; **near chance**" if bold and r.get("near_chance") else "; near chance" if r.get("near_chance")
                   else "")


# ----------------------------------------------------------------------------- per-layer


def per_layer(results: Sequence[VariantResults]) -> dict:
    """{"layers": [embeddings, layer.0.., pooler, final_norm, head], "trainable": {variant: {layer: n}},
    "total": {...}}; a layer a variant does not have (a truncated depth) is absent from its mapping."""
    trainable, total = {}, {}
    for r in results:
        trainable[r.variant] = {row["name"]: int(row.get("trainable", 0)) for row in r.audit.layers}
        total[r.variant] = {row["name"]: int(row.get("total", 0)) for row in r.audit.layers}
    return {"layers": ordered_layer_names(r.audit for r in results), "trainable": trainable, "total": total}


# ----------------------------------------------------------------------------- the report


def pretraining_summary(record: dict | None) -> dict | None:
    """What developing the base model cost (the pretrain stage's record), or None when pretraining was off."""
    if not record or not record.get("enabled"):
        return None
    cov = record.get("coverage") or {}
    val = record.get("val_curve") or []
    return {"objective": record.get("objective"), "base": record.get("base"), "steps": record.get("steps"),
            "stopped_by": record.get("stopped_by"), "tokens": record.get("tokens"),
            "train_time_s": record.get("train_time_s"), "tokens_per_s": record.get("tokens_per_s"),
            "mfu": record.get("mfu"), "total_params": record.get("total_params"),
            "perplexity_start": val[0].get(metrics.PRETRAIN.name) if val else None,
            "perplexity_final": record.get("final_perplexity"),
            "tokenizer": {k: (record.get("tokenizer") or {}).get(k) for k in ("trained", "kind", "vocab_size")},
            "unk_fraction": {split: (cov.get(split) or {}).get("unk_fraction") for split in cov}}


def build_report(results: Sequence[VariantResults], *, metric: str = "accuracy", tolerance: float = 0.01,
                 alpha: float = 0.05, pretraining: dict | None = None) -> dict:
    """Rows (with p vs best), both Pareto fronts (marked on the rows), the verdict and the per-layer counts.

    `pretraining`: the pretrain stage's record; when it ran, its cost goes into the report and each row
    built from it gets `with_pretraining_s` (its own train time + the pretraining that made its start)."""
    rows = [build_row(r) for r in results]
    fronts = pareto_fronts(rows)
    for r in rows:
        r["pareto_params"], r["pareto_time"] = (r["variant"] in fronts[f] for f in front_names(quality_metric(rows)))
    best = pick_best(rows, metric)["variant"]
    p_values = paired_p_values(results, metric, best)
    for r in rows:
        r["p_vs_best"] = None if r["variant"] == best else p_values[r["variant"]]
    verdict = best_and_cheapest(rows, metric, tolerance, alpha)
    pre = pretraining_summary(pretraining)
    for r in rows:
        r["with_pretraining_s"] = (r["train_time_s"] + pre["train_time_s"]
                                   if pre and pre.get("train_time_s") is not None and r["init"] != "scratch" else None)
    kinds = sorted({r["peak_memory_kind"] for r in rows if r["peak_memory_kind"]})
    top = next(r for r in results if r.variant == best)
    return {"rows": rows, "fronts": fronts, "verdict": verdict, "layers": per_layer(results),
            "metric": metric, "tolerance": tolerance, "alpha": alpha, "memory_kinds": kinds, "pretraining": pre,
            "classes": class_section(top.eval), "loss_curves": {r.variant: r.train.loss_curve for r in results},
            "unknown_fraction": max((r.audit.unknown_fraction for r in results if r.audit.unknown_fraction is not None),
                                    default=None)}


def time_columns(timing: dict) -> dict:
    """The train time predicted before training (depthtune.planning.step_time) for the steps that ran, and what it rested on."""
    tp = timing.get("throughput") or {}
    return {"predicted_train_s": timing.get("predicted_s_for_steps_run"), "time_ratio": timing.get("time_ratio"),
            "mfu": timing.get("mfu"), "efficiency": tp.get("efficiency"),
            "efficiency_source": tp.get("efficiency_source"), "gemm_flops_per_s": tp.get("gemm_flops_per_s")}


def unknown_text_caution(fraction) -> list[str]:
    """A caution above the table when the tokenizer could not read more than 1% of the text (tokenization report)."""
    if fraction is None or fraction <= 0.01:
        return []
    return [f"**Caution**: {fraction:.1%} of the text is unknown to the tokenizer (data/tokenized/report.json): "
            "accuracy on text the model cannot read means little.", ""]
