"""The comparison report as files: comparison.md, comparison.json, variants.csv, pareto.png, depth.png.

Pure formatting of the report dict that depthtune.report.comparison.build_report makes (no statistics here):

    outputs = render_outputs(build_report(results, ...))   # {file name: bytes}, written by stages/compare.py
"""
from __future__ import annotations

import csv
import io
import json
from typing import Sequence

from depthtune import tasks
from depthtune.evaluation import metrics
from depthtune.evaluation.class_summary import class_markdown
from depthtune.report.comparison import (NOT_CONVERGED, SCHEMA, fmt_metric, fmt_p, front_names, metric_label, metric_sign,
                              quality_metric, unknown_text_caution, converged_by, stopped_by)
from depthtune.report.page import index_html
from depthtune.report.plots import depth_png, human, pareto_png



def _flat_metrics(r: dict) -> dict:
    """One variant's numbers for `dvc metrics show` (numbers only: lists and nulls are skipped there)."""
    out = {}
    for m in tasks.get(r.get("task", "classification")).metrics:
        out[m] = r[m]
        out[f"{m}_ci_low"], out[f"{m}_ci_high"] = r[f"{m}_ci"]
    out["p_vs_best"] = 1.0 if r["p_vs_best"] is None else r["p_vs_best"]  # the best against itself: p = 1
    out["trainable_params"] = r["trainable_params"]
    out["train_time_s"] = r["train_time_s"]
    return out


def comparison_json(report: dict) -> dict:
    v, layers = report["verdict"], report["layers"]
    return {
        "schema": SCHEMA,
        "metric": report["metric"],
        "tolerance": report["tolerance"],
        "alpha": report["alpha"],
        "variants": {r["variant"]: _flat_metrics(r) for r in report["rows"]},
        "best": v["best"],
        "cheapest": v["cheapest"],
        "verdict": {k: v[k] for k in ("test", "n_test", "significant", "indistinguishable", "unsettled", "near_chance",
                                                 "sentence", "seeds") if k in v},
        # lists below: `dvc metrics show` skips them, so the metrics table stays narrow
        "pareto": dict(report["fronts"]),
        "classes": report.get("classes"),  # the top variant's worst classes and most confused pairs
        "pretraining": report.get("pretraining"),  # what developing the base model cost (None: pretraining off)
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


TABLE_HEADER = ("| variant | description | depth | trainable | total | trainable % | est. mem MiB | "
                "peak mem MiB | peak/est | train s | samples/s | {m1} (95% CI) | {m2} (95% CI) | "
                "p vs best | p50 ms | p95 ms | Pareto params | Pareto time |")
TABLE_ALIGN = "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|:---:|"


def _top_tag(verdict: dict) -> str:
    """"best" only when the paired tests say so; "top" (highest point estimate) otherwise."""
    return "best" if verdict["significant"] else "top"


def _with_ci(r: dict, metric: str) -> str:
    lo, hi = r[f"{metric}_ci"]
    return f"{fmt_metric(r[metric])} [{lo:.3f}, {hi:.3f}]"


def task_metrics(report: dict) -> tuple[str, str]:
    """The two test metrics of the rows' task: (accuracy, macro_f1) or (perplexity, bits_per_byte)."""
    return tasks.get(report["rows"][0].get("task", "classification")).metrics


def comparison_table(report: dict) -> str:
    v = report["verdict"]
    best, cheap, top = v["best"]["variant"], v["cheapest"]["variant"], _top_tag(v)
    m1, m2 = task_metrics(report)
    lines = [TABLE_HEADER.format(m1=metric_label(m1), m2=metric_label(m2)), TABLE_ALIGN]
    for r in report["rows"]:
        tags = (f" {NOT_CONVERGED}" if r["not_converged"] else "") + \
               (f" ({top})" if r["variant"] == best else "") + \
               (" (cheapest)" if r["variant"] == cheap and cheap != best else "")
        lines.append(
            f"| {r['variant']}{tags} | {r['description']} | {r['depth']} | {_int(r['trainable_params'])} | "
            f"{_int(r['total_params'])} | {r['trainable_pct']:.2f} | {_mib(r['estimated_memory_bytes'])} | "
            f"{_mib(r['peak_memory_bytes'])} | {_num(r['memory_ratio'], '.2f')} | {r['train_time_s']:.1f} | "
            f"{_num(r['samples_per_s'], '.1f')} | {_with_ci(r, m1)} | {_with_ci(r, m2)} | "
            f"{fmt_p(r['p_vs_best'])} | {_num(r['latency_p50_ms'], '.2f')} | {_num(r['latency_p95_ms'], '.2f')} | "
            f"{'●' if r['pareto_params'] else ''} | {'●' if r['pareto_time'] else ''} |")
    return "\n".join(lines)


def training_table(rows: Sequence[dict]) -> list[str]:
    """How each variant was trained: its lr (searched or not), epochs, where the best was, convergence;
    and, with train.seeds > 1, the accuracy (a causal LM's perplexity) across seeds."""
    q = quality_metric(rows)
    seeded = any(r.get(f"seed_{q}") for r in rows)
    head = "| variant | lr | epochs run | best at epoch | stopped | converged |" + \
        (f" seeds | {q} across seeds: mean ± sd (min-max) |" if seeded else "")
    lines = ["## Training", "", head, "|---|---:|---:|---:|---|---|" + ("---:|---|" if seeded else "")]
    for r in rows:
        lr = "—" if r.get("lr") is None else f"{r['lr']:.3g}"
        lr += (" (searched, grid edge)" if r.get("lr_at_edge") else " (searched)") if r.get("lr_searched") else ""
        line = (f"| {r['variant']} | {lr} | {_num(r.get('epochs_run'), 'g')} | {_num(r.get('best_epoch'), 'g')} | "
                f"{stopped_by(r)} | {converged_by(r, bold=True)} |")
        if seeded:
            s = r.get(f"seed_{q}")
            line += (f" {r['seeds']} | {s['mean']:.4f} ± {s['sd']:.4f} ({s['min']:.4f}-{s['max']:.4f}) |" if s
                     else " 1 | — |")
        lines.append(line)
    note = ("Seeds: the same variant trained with seeds seed, seed+1, ... at the same lr, each model scored on "
            "the same test texts; the paired tests above use the first seed's model.") if seeded else ""
    return lines + [""] + ([note, ""] if note else [])


def cost_table(rows: Sequence[dict]) -> list[str]:
    """Predicted before training against measured: memory (the audit) and time (depthtune.planning.step_time)."""
    if not any(r.get("predicted_train_s") is not None or r.get("peak_memory_bytes") for r in rows):
        return []
    lines = ["## Cost: predicted before training vs measured", "",
             "| variant | est. mem MiB | peak allocated MiB | allocated/est | peak reserved MiB | predicted train s | "
             "train s | measured/predicted | efficiency used | MFU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        eff = "—" if r.get("efficiency") is None else f"{r['efficiency']:.2f} ({r.get('efficiency_source') or '?'})"
        lines.append(f"| {r['variant']} | {_mib(r['estimated_memory_bytes'])} | {_mib(r['peak_memory_bytes'])} | "
                     f"{_num(r['memory_ratio'], '.2f')} | {_mib(r.get('peak_reserved_bytes'))} | "
                     f"{_num(r.get('predicted_train_s'), '.1f')} | {r['train_time_s']:.1f} | "
                     f"{_num(r.get('time_ratio'), '.2f')} | {eff} | {_num(r.get('mfu'), '.2f')} |")
    gemm = next((r["gemm_flops_per_s"] for r in rows if r.get("gemm_flops_per_s")), None)
    return lines + ["", "Allocated: live tensors (CUDA max_memory_allocated; on the CPU the peak of RSS less the "
                    "bytes glibc's heap holds free). Reserved: what the process held on top (CUDA's caching "
                    "allocator; on the CPU the peak RSS growth, glibc's retained free blocks included). Predicted "
                    "train s: the audit's FLOPs of the batches that ran over a GEMM timed before training"
                    + (f" ({gemm / 1e9:,.0f} GFLOP/s)" if gemm else "") + " x the efficiency used, plus the "
                    "optimizer and a per-step floor timed then too (depthtune/planning/step_time.py); MFU = counted FLOPs "
                    "per second over that GEMM rate.", ""]


def pretraining_section(pre: dict | None, rows: Sequence[dict]) -> list[str]:
    """The pretrain stage's cost beside the variants': what developing the base model took."""
    if not pre:
        return []
    minutes = (pre.get("train_time_s") or 0.0) / 60
    unk = ", ".join(f"{k} {v:.1%}" for k, v in (pre.get("unk_fraction") or {}).items() if v is not None)
    tok = pre.get("tokenizer") or {}
    lines = ["## Pretraining: the base model the variants start from", "",
             "| objective | from | parameters | steps | tokens | minutes | tokens/s | MFU | held-out perplexity | "
             "tokenizer | unknown tokens |", "|---|---|---:|---:|---:|---:|---:|---:|---|---|---|",
             f"| {pre.get('objective')} | {pre.get('base')} | {_int(pre.get('total_params'))} | "
             f"{_int(pre.get('steps'))} ({pre.get('stopped_by')}) | {_int(pre.get('tokens'))} | {minutes:.1f} | "
             f"{_num(pre.get('tokens_per_s'), ',.0f')} | {_num(pre.get('mfu'), '.2f')} | "
             f"{_num(pre.get('perplexity_start'), ',.0f')} -> {_num(pre.get('perplexity_final'), ',.1f')} | "
             f"{'trained ' + str(tok.get('kind')) if tok.get('trained') else 'the model' + chr(39) + 's'} "
             f"({_int(tok.get('vocab_size'))}) | {unk or '—'} |", ""]
    paid = [r for r in rows if r.get("with_pretraining_s") is not None]
    if paid:
        lines += ["Train time with the pretraining that made each variant's start (a variant at `init: scratch` "
                  "did not use it): " + ", ".join(f"{r['variant']} {r['train_time_s'] / 60:.1f} + {minutes:.1f} = "
                                                  f"{r['with_pretraining_s'] / 60:.1f} min" for r in paid) + ".", ""]
    return lines


def convergence_notes(rows: Sequence[dict]) -> list[str]:
    """Markdown lines naming every variant not converged or near chance, with its note (empty when none is)."""
    flagged = [r for r in rows if r["not_converged"] or r.get("near_chance")]
    if not flagged:
        return []
    return [f"{NOT_CONVERGED} **not converged**: the validation metric was still rising, significantly, when its "
            "budget ran out (the best of its last validations beat the best before them by the metric's paired "
            "test); its test score may understate what this variant can do. **Near chance**: its best validation "
            "score got less than a tenth of the way from the majority label's to a perfect one.", ""] + \
           [f"- **{r['variant']}**: {r['convergence_note'] or 'no note recorded'}" for r in flagged] + [""]


def layer_table(layers: dict) -> str:
    variants = list(layers["trainable"])
    lines = ["| layer | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
    for n in layers["layers"]:
        lines.append(f"| {n} | " + " | ".join(_int(layers["trainable"][v].get(n)) for v in variants) + " |")
    return "\n".join(lines)


def comparison_markdown(report: dict) -> str:
    rows = {r["variant"]: r for r in report["rows"]}
    metric, tol = report["metric"], report["tolerance"]
    q = quality_metric(report["rows"])
    up = f"{q} {'up' if metrics.higher_is_better(q) else 'down'}"
    front_params, front_time = front_names(q)

    def front_line(title: str, names: list[str], cost_key: str, cost_fmt) -> str:
        chain = " → ".join(f"{n} ({fmt_metric(rows[n][q])}, {cost_fmt(rows[n][cost_key])})"
                           for n in names)
        return f"- **{title}**: {chain}"

    kinds, v = report["memory_kinds"], report["verdict"]
    n_test = f" on {v['n_test']:,} test texts" if v.get("n_test") else ""
    parts = [
        "# Variant comparison", "",
        f"{len(rows)} variants; test-split metrics{n_test}, selection metric **{metric}**, tolerance {tol:g}, "
        f"alpha {report['alpha']:g}. ● marks Pareto-front members ({up}; trainable params or train "
        "time down).", "",
        v["sentence"], "",
        *unknown_text_caution(report.get("unknown_fraction")),
        "## Results", "",
        comparison_table(report), "",
        f"Brackets: 95% percentile bootstrap interval over the test texts. *p vs best*: {v['test']} test "
        f"of each variant's {metric_label(metric)} against {v['best']['variant']} on the same texts (paired); "
        f"p < {report['alpha']:g} means the gap is unlikely to be noise.", "",
        *convergence_notes(report["rows"]),
        *training_table(report["rows"]),
        *cost_table(report["rows"]),
        *pretraining_section(report.get("pretraining"), report["rows"]),
        *class_markdown(report.get("classes")),
        "Memory: *est.* is the audit's training-memory estimate, *peak* the measured peak"
        + (f" ({', '.join(kinds)})" if kinds else "") + "; train s is the optimizer loop only; "
        "latency is batch-1 inference.", "",
        "## Pareto fronts", "",
        f"Cheapest first; each member buys {q} with more cost.", "",
        front_line(f"{q} vs trainable params", report["fronts"][front_params], "trainable_params",
                   lambda x: f"{human(x)} params"),
        front_line(f"{q} vs train time", report["fronts"][front_time], "train_time_s",
                   lambda x: f"{x:.1f} s"), "",
        "![Pareto fronts](pareto.png)", "",
        "## Trainable parameters per layer", "",
        "— = the variant has no such layer (truncated depth).", "",
        layer_table(report["layers"]), "",
        "![Trainable parameters per layer](depth.png)", "",
    ]
    return "\n".join(parts)


def variants_csv(report: dict) -> str:
    """variant,depth,trainable_params,<m1>,<m1>_ci_low,<m1>_ci_high,<m2>,train_time_s (m1, m2: the task's metrics)."""
    m1, m2 = task_metrics(report)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "depth", "trainable_params", m1, f"{m1}_ci_low", f"{m1}_ci_high", m2, "train_time_s"])
    for r in report["rows"]:
        w.writerow([r["variant"], r["depth"], r["trainable_params"], f"{r[m1]:.6g}",
                    f"{r[f'{m1}_ci'][0]:.6g}", f"{r[f'{m1}_ci'][1]:.6g}", f"{r[m2]:.6g}",
                    f"{r['train_time_s']:.6g}"])
    return buf.getvalue()


def render_outputs(report: dict) -> dict[str, bytes]:
    """Every report file, by name, as bytes (written atomically by the stage)."""
    outputs = {
        "comparison.md": comparison_markdown(report).encode("utf-8"),
        "comparison.json": (json.dumps(comparison_json(report), indent=2) + "\n").encode("utf-8"),
        "variants.csv": variants_csv(report).encode("utf-8"),
        "pareto.png": pareto_plot(report),
        "depth.png": depth_png(report["layers"], {r["variant"]: r["depth"] for r in report["rows"]}),
    }
    return {**outputs, "index.html": index_html(report, outputs)}  # the page a person opens offline


def pareto_plot(report: dict) -> bytes:
    """pareto.png: both fronts with every variant's 95% accuracy interval; best - tolerance dotted."""
    v, q = report["verdict"], quality_metric(report["rows"])
    floor = v["best"][q] - metric_sign(q) * v["tolerance"] if v["metric"] == q else None
    tag = _top_tag(v) if v["metric"] == q else f"{_top_tag(v)} by {metric_label(v['metric'])}"
    rows = [{**r, "quality": r[q], "quality_ci": r[f"{q}_ci"]} for r in report["rows"]]  # what the plot draws
    params_front, time_front = front_names(q)
    return pareto_png(rows, report["fronts"][params_front], report["fronts"][time_front],
                      best=v["best"]["variant"], cheapest=v["cheapest"]["variant"], floor=floor, best_tag=tag,
                      quality=q, lower_is_better=not metrics.higher_is_better(q))
