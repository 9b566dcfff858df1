"""reports/index.html: the comparison report as one self-contained page a person opens offline.

Pure: the report dict (depthtune.report.comparison.build_report) and the figures already rendered in memory in,
bytes out. Everything the page shows is inside the file: the figures are PNG data URIs, the style is
an inline <style>; no script, font, stylesheet or image is fetched, so a browser with no network shows
all of it. Every text that comes from the data (variant names, descriptions, labels) goes through
html.escape.

    html_bytes = index_html(report, {"pareto.png": ..., "depth.png": ...})

Sections: verdict, results table (95% intervals, p vs best, Pareto members), training, per class
(the top variant's worst classes and most confused pairs), Pareto figure, loss curves (drawn here from
report["loss_curves"]: {variant: [{step, loss}, ...]}, the train records' loss_curve), per-layer figure.
"""
from __future__ import annotations

import base64
import html
import re
from typing import Optional

from depthtune import tasks
from depthtune.report.comparison import NOT_CONVERGED, fmt_metric, fmt_p, metric_label, unknown_text_caution
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


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def bold_markdown(text: str) -> str:
    """The verdict sentence carries **bold** markdown: escaped, then the pairs become <strong>."""
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", esc(text))


def _num(x, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _with_ci(r: dict, metric: str) -> str:
    lo, hi = r[f"{metric}_ci"]
    return f"{fmt_metric(r[metric])} [{lo:.3f}, {hi:.3f}]"


def table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """An HTML table of already-formatted strings (escaped here); columns in `numeric` align right."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class=\"n\">{esc(c)}</td>" if i in numeric else f"<td>{esc(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>"


def results_table(report: dict) -> str:
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


def training_table(rows: list[dict]) -> str:
    body = [[r["variant"], _num(r.get("lr"), ".3g") + (" (searched)" if r.get("lr_searched") else ""),
             _num(r.get("epochs_run"), "g"), _num(r.get("best_epoch"), "g"),
             "early stopping" if r.get("stopped_early") else "epoch limit",
             f"no {NOT_CONVERGED}: {r.get('convergence_note') or ''}" if r["not_converged"] else "yes"]
            for r in rows]
    return table(["variant", "lr", "epochs run", "best at epoch", "stopped", "converged"], body, numeric={1, 2, 3})


def class_html(section: Optional[dict]) -> str:
    """The top variant's worst classes by F1 and its most confused pairs, by label name (empty for a causal LM)."""
    if not section:
        return ""
    n, worst = section["classes"], section["worst"]
    which = "every class" if len(worst) == n else f"the {len(worst)} of {n} classes with the lowest F1"
    parts = ["<h2 id=\"classes\">Per class</h2>",
             f"<p>{esc(section['variant'])} on the test split: {esc(which)}, worst first.</p>",
             table(["class", "F1", "precision", "recall", "test texts"],
                   [[r["label"], f"{r['f1']:.3f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['support']:,}"]
                    for r in worst], numeric={1, 2, 3, 4})]
    if section["confused"]:
        parts += ["<p>Most confused (true → predicted):</p>",
                  table(["true", "predicted", "texts", "share of the true class"],
                        [[c["true"], c["predicted"], f"{c['count']:,}", f"{c['share']:.0%}"]
                         for c in section["confused"]], numeric={2, 3})]
    return "\n".join(parts)


def figure(fig_id: str, png: Optional[bytes], alt: str, missing: str) -> str:
    """An <img> holding the PNG as a base64 data URI (no file beside the page needed)."""
    if not png:
        return f"<p class=\"note\" id=\"{esc(fig_id)}\">{esc(missing)}</p>"
    data = base64.b64encode(png).decode("ascii")
    return (f"<figure><img id=\"{esc(fig_id)}\" alt=\"{esc(alt)}\" src=\"data:image/png;base64,{data}\">"
            f"<figcaption class=\"note\">{esc(alt)}</figcaption></figure>")


def index_html(report: dict, figures: dict) -> bytes:
    """The page, UTF-8. figures: {"pareto.png": bytes, "depth.png": bytes} (render_outputs' own)."""
    v, rows = report["verdict"], report["rows"]
    curves = report.get("loss_curves") or {}
    loss = loss_png(curves) if any(curves.values()) else None
    n_test = f" on {v['n_test']:,} test texts" if v.get("n_test") else ""
    body = [
        "<h1>Variant comparison</h1>",
        f"<p>{len(rows)} variants; test-split metrics{esc(n_test)}, selection metric "
        f"<strong>{esc(report['metric'])}</strong>, tolerance {report['tolerance']:g}, alpha {report['alpha']:g}. "
        "● marks Pareto-front members. Written by the compare stage beside comparison.md.</p>",
        f"<p class=\"verdict\" id=\"verdict\">{bold_markdown(v['sentence'])}</p>",
        *(f"<p class=\"note\">{bold_markdown(line)}</p>"
          for line in unknown_text_caution(report.get("unknown_fraction")) if line),
        "<h2>Results</h2>", results_table(report),
        f"<p class=\"note\">Brackets: 95% bootstrap interval over the test texts. p vs best: {esc(v['test'])} test "
        f"against {esc(v['best']['variant'])} on the same texts. {esc(NOT_CONVERGED)}: still improving when "
        "training stopped.</p>",
        "<h2>Training</h2>", training_table(rows),
        class_html(report.get("classes")),
        "<h2>Pareto fronts</h2>",
        figure("fig-pareto", figures.get("pareto.png"), "Quality vs trainable parameters and vs train time", ""),
        "<h2>Loss curves</h2>",
        figure("fig-loss", loss, "Training loss per optimizer step, per variant",
               "No loss curves in this report (the train records carry none)."),
        "<h2>Trainable parameters per layer</h2>",
        figure("fig-depth", figures.get("depth.png"),
               "Trainable parameters per layer bucket (0 = frozen, — = layer not kept)", ""),
    ]
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<title>depthtune: variant comparison</title>\n"
            f"<style>{STYLE}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")
    return page.encode("utf-8")

