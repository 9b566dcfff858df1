"""reports/index.html: the comparison report as one self-contained page a person opens offline.

Pure: the report dict (depthtune.report.comparison.build_report) and the figures already rendered in memory in,
bytes out. Everything the page shows is inside the file: the figures are PNG data URIs, the style is
an inline <style>; no script, font, stylesheet or image is fetched, so a browser with no network shows
all of it. The page is a jinja2 template (PAGE) rendered with autoescape: every text that comes from the data
(variant names, descriptions, labels) is escaped; this module only formats the cells.

    html_bytes = index_html(report, {"pareto.png": ..., "depth.png": ...})

Sections: verdict, results table (95% intervals, p vs best, Pareto members), training, per class
(the top variant's worst classes and most confused pairs), Pareto figure, loss curves (drawn here from
report["loss_curves"]: {variant: [{step, loss}, ...]}, the train records' loss_curve), per-layer figure.
"""
from __future__ import annotations

import base64
import re
from typing import Optional

import jinja2
from markupsafe import Markup, escape

from depthtune import tasks
from depthtune.report.comparison import (NOT_CONVERGED, converged_by, fmt_metric, fmt_p, metric_label, stopped_by,
                                         unknown_text_caution)
from depthtune.report.plots import loss_png

STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1500px; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; } th { background: #f2f2f2; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.verdict { background: #f6f8fa; border-left: 4px solid #1f77b4; padding: 8px 12px; }
figure { margin: 8px 0; } img { max-width: 100%; border: 1px solid #eee; }
.note { color: #555; font-size: 0.9em; }
"""


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>depthtune: variant comparison</title>
<style>{{ style }}</style>
</head>
<body>
{%- macro table(t) %}
<table>
<tr>{% for h in t.header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in t.rows %}<tr>{% for c in row %}<td{% if loop.index0 in t.numeric %} class="n"{% endif %}>{{ c }}</td>
{%- endfor %}</tr>
{% endfor %}</table>
{%- endmacro %}
{%- macro figure(f) %}
{%- if f.data %}
<figure><img id="{{ f.id }}" alt="{{ f.alt }}" src="data:image/png;base64,{{ f.data }}">\
<figcaption class="note">{{ f.alt }}</figcaption></figure>
{%- else %}
<p class="note" id="{{ f.id }}">{{ f.missing }}</p>
{%- endif %}
{%- endmacro %}
<h1>Variant comparison</h1>
<p>{{ n }} variants; test-split metrics{{ n_test }}, selection metric <strong>{{ metric }}</strong>, tolerance \
{{ tolerance }}, alpha {{ alpha }}. ● marks Pareto-front members. Written by the compare stage beside comparison.md.</p>
<p class="verdict" id="verdict">{{ verdict | bold }}</p>
{%- for line in cautions %}
<p class="note">{{ line | bold }}</p>
{%- endfor %}
<h2>Results</h2>
{{- table(results) }}
<p class="note">Brackets: 95% bootstrap interval over the test texts. p vs best: {{ test }} test against {{ best }} \
on the same texts. {{ not_converged }}: not converged (validation still rising, significantly, when its budget ran out).</p>
<h2>Training</h2>
{{- table(training) }}
{%- if classes %}
<h2 id="classes">Per class</h2>
<p>{{ classes.variant }} on the test split: {{ classes.which }}, worst first.</p>
{{- table(classes.worst) }}
{%- if classes.confused %}
<p>Most confused (true → predicted):</p>
{{- table(classes.confused) }}
{%- endif %}
{%- endif %}
<h2>Pareto fronts</h2>
{{- figure(pareto) }}
<h2>Loss curves</h2>
{{- figure(loss) }}
<h2>Trainable parameters per layer</h2>
{{- figure(depth) }}
</body>
</html>
"""


def bold_markdown(text: str) -> Markup:
    """The verdict sentence carries **bold** markdown: escaped, then the pairs become <strong>."""
    return Markup(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", str(escape(text))))


def _num(x, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _with_ci(r: dict, metric: str) -> str:
    lo, hi = r[f"{metric}_ci"]
    return f"{fmt_metric(r[metric])} [{lo:.3f}, {hi:.3f}]"


def table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> dict:
    """A table of already-formatted strings for the template (escaped there); columns in `numeric` align right."""
    return {"header": header, "rows": rows, "numeric": set(numeric)}


def results_table(report: dict) -> dict:
    """One row per variant: cost, quality with 95% intervals, p vs best, Pareto membership."""
    v = report["verdict"]
    m1, m2 = tasks.get(report["rows"][0].get("task", "classification")).metrics
    best, cheap = v["best"]["variant"], v["cheapest"]["variant"]
    top = "best" if v["significant"] else "top"
    header = ["variant", "description", "depth", "trainable", "trainable %", "train s", "samples/s",
              f"{metric_label(m1)} (95% CI)", f"{metric_label(m2)} (95% CI)", "p vs best", "p50 ms",
              "Pareto params", "Pareto time"]
    rows = []
    for r in report["rows"]:
        tags = (f" {NOT_CONVERGED}" if r["not_converged"] else "") + (f" ({top})" if r["variant"] == best else "") + \
               (" (cheapest)" if r["variant"] == cheap and cheap != best else "")
        rows.append([r["variant"] + tags, r["description"], str(r["depth"]), f"{r['trainable_params']:,}",
                     f"{r['trainable_pct']:.2f}", f"{r['train_time_s']:.1f}", _num(r["samples_per_s"], ".1f"),
                     _with_ci(r, m1), _with_ci(r, m2), fmt_p(r["p_vs_best"]), _num(r["latency_p50_ms"], ".2f"),
                     "●" if r["pareto_params"] else "", "●" if r["pareto_time"] else ""])
    return table(header, rows, numeric={2, 3, 4, 5, 6, 7, 8, 9, 10})


def training_table(rows: list[dict]) -> dict:
    body = [[r["variant"], _num(r.get("lr"), ".3g") + (" (searched)" if r.get("lr_searched") else ""),
             _num(r.get("epochs_run"), "g"), _num(r.get("best_epoch"), "g"),
             stopped_by(r), converged_by(r)]
            for r in rows]
    return table(["variant", "lr", "epochs run", "best at epoch", "stopped", "converged"], body, numeric={1, 2, 3})


def class_tables(section: Optional[dict]) -> Optional[dict]:
    """The top variant's worst classes by F1 and its most confused pairs, by label name (None for a causal LM)."""
    if not section:
        return None
    n, worst = section["classes"], section["worst"]
    confused = section["confused"]
    return {"variant": section["variant"],
            "which": "every class" if len(worst) == n else f"the {len(worst)} of {n} classes with the lowest F1",
            "worst": table(["class", "F1", "precision", "recall", "test texts"],
                           [[r["label"], f"{r['f1']:.3f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}",
                             f"{r['support']:,}"] for r in worst], numeric={1, 2, 3, 4}),
            "confused": table(["true", "predicted", "texts", "share of the true class"],
                              [[c["true"], c["predicted"], f"{c['count']:,}", f"{c['share']:.0%}"] for c in confused],
                              numeric={2, 3}) if confused else None}


def figure(fig_id: str, png: Optional[bytes], alt: str, missing: str) -> dict:
    """An <img> holding the PNG as a base64 data URI (no file beside the page needed), or the `missing` note."""
    return {"id": fig_id, "alt": alt, "missing": missing,
            "data": base64.b64encode(png).decode("ascii") if png else None}


def index_html(report: dict, figures: dict) -> bytes:
    """The page, UTF-8. figures: {"pareto.png": bytes, "depth.png": bytes} (render_outputs' own)."""
    v, rows = report["verdict"], report["rows"]
    curves = report.get("loss_curves") or {}
    loss = loss_png(curves) if any(curves.values()) else None
    env = jinja2.Environment(autoescape=True, keep_trailing_newline=True)
    env.filters["bold"] = bold_markdown
    page = env.from_string(PAGE).render(
        style=Markup(STYLE), n=len(rows), n_test=f" on {v['n_test']:,} test texts" if v.get("n_test") else "",
        metric=report["metric"], tolerance=f"{report['tolerance']:g}", alpha=f"{report['alpha']:g}",
        verdict=v["sentence"], cautions=[line for line in unknown_text_caution(report.get("unknown_fraction")) if line],
        results=results_table(report), test=v["test"], best=v["best"]["variant"], not_converged=NOT_CONVERGED,
        training=training_table(rows), classes=class_tables(report.get("classes")),
        pareto=figure("fig-pareto", figures.get("pareto.png"), "Quality vs trainable parameters and vs train time", ""),
        loss=figure("fig-loss", loss, "Training loss per optimizer step, per variant",
                    "No loss curves in this report (the train records carry none)."),
        depth=figure("fig-depth", figures.get("depth.png"),
                     "Trainable parameters per layer bucket (0 = frozen, — = layer not kept)", ""))
    return page.encode("utf-8")
