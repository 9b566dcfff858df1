"""The comparison report: one table, two Pareto fronts, a verdict, plots.

Pure functions over the per-variant records (depthtune/records.py, docs/results.md):
AuditRecord `audit/<v>.json`, TrainRecord `metrics/train/<v>.json`, EvalRecord
`metrics/eval/<v>.json`. Nothing is recomputed from models; this module imports
neither torch nor the orchestrator.

    results = load_results(variants, audit_dir=..., train_dir=..., eval_dir=...)  # [VariantResults]
    report = build_report(results, metric="accuracy", tolerance=0.01)
    outputs = render_outputs(report)      # {file name: bytes}, written by stages/compare.py

Outputs (names relative to the report folder):
- `comparison.md`   header, table (Pareto members marked), fronts, verdict, per-layer table
- `comparison.json` schema `depthtune.compare/1`: `metric`, `tolerance`, `variants`
                    (flat, for `dvc metrics`), `best`, `cheapest`, and as lists (which
                    `dvc metrics show` skips) `rows`, `layers`; `pareto` (name lists)
- `variants.csv`    variant,depth,trainable_params,accuracy,macro_f1,train_time_s (`dvc plots`)
- `pareto.png`      accuracy vs trainable params (log x) and vs train time, fronts drawn
- `depth.png`       heatmap of trainable params per layer bucket per variant (log colour)
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from depthtune import layout
from depthtune.errors import DepthtuneError
from depthtune.layer_order import ordered_layer_names
from depthtune.records import AuditRecord, EvalRecord, TrainRecord, read_variant_record

SCHEMA = "depthtune.compare/1"
METRICS = ("accuracy", "macro_f1")
FRONT_PARAMS = "accuracy_vs_trainable_params"
FRONT_TIME = "accuracy_vs_train_time"
CSV_COLUMNS = ("variant", "depth", "trainable_params", "accuracy", "macro_f1", "train_time_s")
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
        "depth": t.depth,
        "trainable_params": a.trainable_params,
        "total_params": a.total_params,
        "trainable_pct": 100.0 * a.trainable_params / a.total_params if a.total_params else 0.0,
        "estimated_memory_bytes": est,
        "peak_memory_bytes": peak,
        "peak_memory_kind": t.peak_memory_kind,
        "memory_ratio": ratio,
        "train_time_s": float(t.train_time_s),
        "samples_per_s": t.samples_per_s,
        "accuracy": float(e.accuracy),
        "macro_f1": float(e.macro_f1),
        "latency_p50_ms": _optional_number(e.latency_ms.get("p50"), res.paths["eval"], "latency_ms.p50"),
        "latency_p95_ms": _optional_number(e.latency_ms.get("p95"), res.paths["eval"], "latency_ms.p95"),
    }


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


def pareto_fronts(rows: Sequence[dict]) -> dict[str, list[str]]:
    return {FRONT_PARAMS: pareto_front((r["variant"], r["accuracy"], r["trainable_params"]) for r in rows),
            FRONT_TIME: pareto_front((r["variant"], r["accuracy"], r["train_time_s"]) for r in rows)}


def _fmt_metric(x: float) -> str:
    return f"{x:.4f}"


def best_and_cheapest(rows: Sequence[dict], metric: str = "accuracy", tolerance: float = 0.01) -> dict:
    """Best variant by `metric` (ties: fewer trainable params, then params order) and the
    cheapest (fewest trainable params; ties: higher metric) with metric >= best - tolerance."""
    if metric not in METRICS:
        raise DepthtuneError(f"evaluation.metric: {metric!r} is not one of {', '.join(METRICS)}")
    if not rows:
        raise DepthtuneError("compare: no variants to compare")
    order = {r["variant"]: i for i, r in enumerate(rows)}
    best = min(rows, key=lambda r: (-r[metric], r["trainable_params"], order[r["variant"]]))
    floor = best[metric] - tolerance
    within = [r for r in rows if r[metric] >= floor - _EPS]
    cheap = min(within, key=lambda r: (r["trainable_params"], -r[metric], order[r["variant"]]))
    label = {"macro_f1": "macro-F1"}.get(metric, metric)
    sentence = (f"Best by {label}: **{best['variant']}** ({_fmt_metric(best[metric])}, "
                f"{best['trainable_params']:,} trainable params). ")
    if cheap["variant"] == best["variant"]:
        sentence += f"No variant with fewer trainable params is within {tolerance:g} of it."
    else:
        factor = best["trainable_params"] / cheap["trainable_params"] if cheap["trainable_params"] else math.inf
        sentence += (f"Cheapest within {tolerance:g} of it: **{cheap['variant']}** "
                     f"({_fmt_metric(cheap[metric])}, {best[metric] - cheap[metric]:.4f} behind, "
                     f"{cheap['trainable_params']:,} trainable params, "
                     f"{'all frozen' if math.isinf(factor) else f'{factor:,.1f}x fewer'}).")
    return {
        "metric": metric,
        "tolerance": tolerance,
        "best": {"variant": best["variant"], metric: best[metric], "trainable_params": best["trainable_params"]},
        "cheapest": {"variant": cheap["variant"], metric: cheap[metric],
                     "trainable_params": cheap["trainable_params"], "gap": round(best[metric] - cheap[metric], 12)},
        "sentence": sentence,
    }


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


def build_report(results: Sequence[VariantResults], *, metric: str = "accuracy", tolerance: float = 0.01) -> dict:
    """Rows, both Pareto fronts (marked on the rows), the verdict and the per-layer counts."""
    rows = [build_row(r) for r in results]
    fronts = pareto_fronts(rows)
    for r in rows:
        r["pareto_params"] = r["variant"] in fronts[FRONT_PARAMS]
        r["pareto_time"] = r["variant"] in fronts[FRONT_TIME]
    verdict = best_and_cheapest(rows, metric, tolerance)
    kinds = sorted({r["peak_memory_kind"] for r in rows if r["peak_memory_kind"]})
    return {"rows": rows, "fronts": fronts, "verdict": verdict, "layers": per_layer(results),
            "metric": metric, "tolerance": tolerance, "memory_kinds": kinds}


def comparison_json(report: dict) -> dict:
    v, layers = report["verdict"], report["layers"]
    return {
        "schema": SCHEMA,
        "metric": report["metric"],
        "tolerance": report["tolerance"],
        "variants": {r["variant"]: {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"],
                                    "trainable_params": r["trainable_params"],
                                    "train_time_s": r["train_time_s"]} for r in report["rows"]},
        "best": v["best"],
        "cheapest": v["cheapest"],
        # lists below: `dvc metrics show` skips them, so the metrics table stays narrow
        "pareto": dict(report["fronts"]),
        "rows": report["rows"],
        "layers": [{"name": n,
                    "trainable": {v: t[n] for v, t in layers["trainable"].items() if n in t},
                    "total": {v: t[n] for v, t in layers["total"].items() if n in t}}
                   for n in layers["layers"]],
    }


# ----------------------------------------------------------------------------- text formats


def _int(n) -> str:
    return "—" if n is None else f"{int(n):,}"


def _mib(n) -> str:
    return "—" if n is None else f"{n / 2 ** 20:,.1f}"


def _num(x, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def human(n: float) -> str:
    """12 -> '12', 74498 -> '74.5k', 22713986 -> '22.7M'."""
    n = float(n)
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            s = f"{n / div:.1f}".rstrip("0").rstrip(".")
            return s + suf
    return f"{n:.0f}"


TABLE_HEADER = ("| variant | description | depth | trainable | total | trainable % | est. mem MiB | "
                "peak mem MiB | peak/est | train s | samples/s | accuracy | macro-F1 | p50 ms | p95 ms | "
                "Pareto params | Pareto time |")
TABLE_ALIGN = "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|:---:|"


def comparison_table(report: dict) -> str:
    best = report["verdict"]["best"]["variant"]
    cheap = report["verdict"]["cheapest"]["variant"]
    lines = [TABLE_HEADER, TABLE_ALIGN]
    for r in report["rows"]:
        tags = (" (best)" if r["variant"] == best else "") + \
               (" (cheapest)" if r["variant"] == cheap and cheap != best else "")
        lines.append(
            f"| {r['variant']}{tags} | {r['description']} | {r['depth']} | {_int(r['trainable_params'])} | "
            f"{_int(r['total_params'])} | {r['trainable_pct']:.2f} | {_mib(r['estimated_memory_bytes'])} | "
            f"{_mib(r['peak_memory_bytes'])} | {_num(r['memory_ratio'], '.2f')} | {r['train_time_s']:.1f} | "
            f"{_num(r['samples_per_s'], '.1f')} | {_fmt_metric(r['accuracy'])} | {_fmt_metric(r['macro_f1'])} | "
            f"{_num(r['latency_p50_ms'], '.2f')} | {_num(r['latency_p95_ms'], '.2f')} | "
            f"{'●' if r['pareto_params'] else ''} | {'●' if r['pareto_time'] else ''} |")
    return "\n".join(lines)


def layer_table(layers: dict) -> str:
    variants = list(layers["trainable"])
    lines = ["| layer | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
    for n in layers["layers"]:
        lines.append(f"| {n} | " + " | ".join(_int(layers["trainable"][v].get(n)) for v in variants) + " |")
    return "\n".join(lines)


def comparison_markdown(report: dict) -> str:
    rows = {r["variant"]: r for r in report["rows"]}
    metric, tol = report["metric"], report["tolerance"]

    def front_line(title: str, names: list[str], cost_key: str, cost_fmt) -> str:
        chain = " → ".join(f"{n} ({_fmt_metric(rows[n]['accuracy'])}, {cost_fmt(rows[n][cost_key])})"
                           for n in names)
        return f"- **{title}**: {chain}"

    kinds = report["memory_kinds"]
    parts = [
        "# Variant comparison", "",
        f"{len(rows)} variants; test-split metrics, selection metric **{metric}**, tolerance {tol:g}. "
        "● marks Pareto-front members (accuracy up; trainable params or train time down).", "",
        report["verdict"]["sentence"], "",
        "## Results", "",
        comparison_table(report), "",
        "Memory: *est.* is the audit's training-memory estimate, *peak* the measured peak"
        + (f" ({', '.join(kinds)})" if kinds else "") + "; train s is the optimizer loop only; "
        "latency is batch-1 inference.", "",
        "## Pareto fronts", "",
        "Cheapest first; each member buys accuracy with more cost.", "",
        front_line("accuracy vs trainable params", report["fronts"][FRONT_PARAMS], "trainable_params",
                   lambda x: f"{human(x)} params"),
        front_line("accuracy vs train time", report["fronts"][FRONT_TIME], "train_time_s",
                   lambda x: f"{x:.1f} s"), "",
        "![Pareto fronts](pareto.png)", "",
        "## Trainable parameters per layer", "",
        "— = the variant has no such layer (truncated depth).", "",
        layer_table(report["layers"]), "",
        "![Trainable parameters per layer](depth.png)", "",
    ]
    return "\n".join(parts)


def variants_csv(report: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in report["rows"]:
        w.writerow([r["variant"], r["depth"], r["trainable_params"], f"{r['accuracy']:.6g}",
                    f"{r['macro_f1']:.6g}", f"{r['train_time_s']:.6g}"])
    return buf.getvalue()


# ----------------------------------------------------------------------------- plots


def _figure(w: float, h: float):
    # The OO API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, facecolor="white")
    return buf.getvalue()


def _log_limits(values: Sequence[float]) -> tuple[float, float]:
    pos = [v for v in values if v > 0]
    lo, hi = (min(pos), max(pos)) if pos else (1.0, 10.0)
    span = math.log10(hi) - math.log10(lo)
    pad = max(0.3, 0.16 * span)  # room for a centred label over the outermost points
    return 10 ** (math.log10(lo) - pad), 10 ** (math.log10(hi) + pad)


def _scatter_panel(ax, rows, front, cost_key, *, log_x, xlabel, title, floor=None):
    on = [r for r in rows if r["variant"] in front]
    off = [r for r in rows if r["variant"] not in front]

    def cost(r):  # a log axis cannot show 0: clamp to 1
        return max(r[cost_key], 1) if log_x else r[cost_key]

    if off:
        ax.scatter([cost(r) for r in off], [r["accuracy"] for r in off], s=70, color="#9e9e9e",
                   edgecolor="black", linewidth=0.6, zorder=3, label="dominated")
    ax.scatter([cost(r) for r in on], [r["accuracy"] for r in on], s=110, marker="D", color="#d62728",
               edgecolor="black", linewidth=0.6, zorder=4, label="Pareto front")
    f_rows = sorted(on, key=lambda r: (cost(r), r["accuracy"]))
    xs, ys = [cost(r) for r in f_rows], [r["accuracy"] for r in f_rows]
    if len(xs) > 1:
        ax.step(xs, ys, where="post", color="#d62728", linewidth=1.6, alpha=0.8, zorder=2)
    if floor is not None:
        ax.axhline(floor, color="#1f77b4", linestyle=":", linewidth=1.2, zorder=1,
                   label=f"best − tolerance ({floor:.3f})")
    if log_x:
        ax.set_xscale("log")
        ax.set_xlim(*_log_limits([cost(r) for r in rows]))
    else:
        hi = max(cost(r) for r in rows) or 1.0
        ax.set_xlim(-0.06 * hi, 1.12 * hi)
    accs = [r["accuracy"] for r in rows] + ([floor] if floor is not None else [])
    span = max(max(accs) - min(accs), 0.02)
    ax.set_ylim(min(accs) - 0.2 * span, max(accs) + 0.2 * span)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(loc="lower right", fontsize=8.5, framealpha=0.9)
    return [(r, cost(r)) for r in rows]


# label candidates around a marker, in points: (dx, dy, horizontal alignment)
_NEAR = [(0, 10, "center"), (0, -19, "center"), (9, -4, "left"), (-9, -4, "right"),
         (8, 8, "left"), (-8, 8, "right"), (8, -16, "left"), (-8, -16, "right")]
_FAR = [(0, 26, "center"), (0, -35, "center"), (14, 22, "left"), (-14, 22, "right"),
        (14, -30, "left"), (-14, -30, "right"), (0, 42, "center"), (0, -51, "center"),
        (20, 36, "left"), (-20, 36, "right"), (20, -44, "left"), (-20, -44, "right")]


def _label_points(ax, points, front, *, best=None, cheap=None, best_tag="best") -> None:
    """Label every marker without overlaps: front members prefer above (away from the
    dominated region), dominated ones below; then beside, then further out with a leader
    line. Labels stay inside the axes and out of the layout (no squashed panels)."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    axbox = ax.get_window_extent(renderer)
    legend = ax.get_legend()
    obstacles = [legend.get_window_extent(renderer)] if legend is not None else []
    px = fig.dpi / 72.0
    for _, (x, y) in [(r, ax.transData.transform((c, r["accuracy"]))) for r, c in points]:
        obstacles.append(Bbox.from_extents(x - 6 * px, y - 6 * px, x + 6 * px, y + 6 * px))
    front_set = set(front)
    for r, x in sorted(points, key=lambda p: (p[0]["variant"] not in front_set, p[1])):
        tag = r["variant"] + (f" ({best_tag})" if r["variant"] == best else "") + \
              (" (cheapest)" if r["variant"] == cheap and cheap != best else "")
        near = _NEAR if r["variant"] in front_set else [_NEAR[1], _NEAR[0], *_NEAR[2:]]
        best_ann, best_score = None, None
        for i, (dx, dy, ha) in enumerate(near + _FAR):
            far = i >= len(near)
            ann = ax.annotate(tag, (x, r["accuracy"]), xytext=(dx, dy), textcoords="offset points",
                              ha=ha, va="bottom" if dy > 0 else "top" if dy < -12 else "center",
                              fontsize=9.5, zorder=5, annotation_clip=False,
                              bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
                              arrowprops={"arrowstyle": "-", "color": "#888888", "linewidth": 0.6,
                                          "shrinkA": 0, "shrinkB": 5} if far else None)
            ann.set_in_layout(False)
            box = ann.get_window_extent(renderer)
            own = Bbox.from_extents(*ax.transData.transform((x, r["accuracy"])) - 6 * px,
                                    *ax.transData.transform((x, r["accuracy"])) + 6 * px)
            hits = sum(box.overlaps(b) for b in obstacles if not b.contains(*own.get_points().mean(axis=0)))
            inside = axbox.contains(box.x0, box.y0) and axbox.contains(box.x1, box.y1)
            score = hits * 10 + (0 if inside else 5) + i * 0.01
            if best_score is None or score < best_score:
                if best_ann is not None:
                    best_ann.remove()
                best_ann, best_score, best_box = ann, score, box
            else:
                ann.remove()
            if hits == 0 and inside:
                break
        obstacles.append(best_box)


def pareto_png(report: dict) -> bytes:
    """Left: accuracy vs trainable params (log x); right: accuracy vs train time. Fronts drawn."""
    rows = report["rows"]
    v = report["verdict"]
    floor = v["best"]["accuracy"] - v["tolerance"] if v["metric"] == "accuracy" else None
    fig = _figure(12.5, 5.2)
    ax1, ax2 = fig.subplots(1, 2)
    p1 = _scatter_panel(ax1, rows, report["fronts"][FRONT_PARAMS], "trainable_params", log_x=True,
                        xlabel="trainable parameters (log scale)", title="Accuracy vs trainable parameters",
                        floor=floor)
    p2 = _scatter_panel(ax2, rows, report["fronts"][FRONT_TIME], "train_time_s", log_x=False,
                        xlabel="train time, optimizer loop (s)", title="Accuracy vs train time")
    fig.suptitle(f"depthtune: {len(rows)} variants, Pareto fronts (accuracy up, cost down)", fontsize=12)
    fig.draw_without_rendering()  # run the layout so label extents are final-ish
    tag = "best" if v["metric"] == "accuracy" else "best F1"
    _label_points(ax1, p1, report["fronts"][FRONT_PARAMS], best=v["best"]["variant"],
                  cheap=v["cheapest"]["variant"], best_tag=tag)
    _label_points(ax2, p2, report["fronts"][FRONT_TIME], best=v["best"]["variant"], best_tag=tag)
    return _png(fig)


def depth_png(report: dict) -> bytes:
    """Heatmap: variants x layer buckets, colour = trainable params (log), each cell labelled."""
    import matplotlib
    import numpy as np
    from matplotlib.colors import LogNorm

    layers = report["layers"]
    names, variants = layers["layers"], list(layers["trainable"])
    data = np.full((len(variants), len(names)), np.nan)
    for i, v in enumerate(variants):
        for j, n in enumerate(names):
            if n in layers["trainable"][v]:
                data[i, j] = layers["trainable"][v][n]
    positive = data[np.isfinite(data) & (data > 0)]
    vmin, vmax = (positive.min(), positive.max()) if positive.size else (1.0, 10.0)
    if vmin == vmax:
        vmin, vmax = vmin / 10, vmax * 10
    # zeros and absent layers: light grey (labelled in the cell)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#ececec")

    fig = _figure(max(7.0, 1.05 * len(names) + 2.8), max(3.2, 0.62 * len(variants) + 2.0))
    ax = fig.subplots()
    shown = np.where(np.isfinite(data) & (data > 0), data, np.nan)
    im = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, norm=LogNorm(vmin=vmin, vmax=vmax), aspect="auto")
    norm = LogNorm(vmin=vmin, vmax=vmax)
    for i in range(len(variants)):
        for j in range(len(names)):
            x = data[i, j]
            if np.isnan(x):
                txt, color = "—", "#777777"
            elif x == 0:
                txt, color = "0", "#777777"
            else:
                txt = human(x)
                color = "white" if norm(x) < 0.6 else "black"
            ax.text(j, i, txt, ha="center", va="center", fontsize=9, color=color)
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=9.5)
    depth = {r["variant"]: r["depth"] for r in report["rows"]}
    ax.set_yticks(range(len(variants)), [f"{v} (depth {depth[v]})" for v in variants], fontsize=9.5)
    ax.set_xticks(np.arange(-0.5, len(names)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(variants)), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    cb = fig.colorbar(im, ax=ax, pad=0.02)
    cb.set_label("trainable parameters (log scale)")
    ax.set_title("Trainable parameters per layer  (0 = frozen, — = layer not kept)", fontsize=11)
    return _png(fig)


def render_outputs(report: dict) -> dict[str, bytes]:
    """Every report file, by name, as bytes (written atomically by the stage)."""
    return {
        "comparison.md": comparison_markdown(report).encode("utf-8"),
        "comparison.json": (json.dumps(comparison_json(report), indent=2) + "\n").encode("utf-8"),
        "variants.csv": variants_csv(report).encode("utf-8"),
        "pareto.png": pareto_png(report),
        "depth.png": depth_png(report),
    }
