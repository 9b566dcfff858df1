"""The comparison report's figures: Pareto scatter plots with 95% intervals, per-layer heatmap.

Leaf module (matplotlib, numpy): called by depthtune/report/comparison.py with plain rows and lists,
it knows nothing of records or the report's JSON. Figures use matplotlib's OO API on the Agg
canvas (no pyplot global state, no display).

    pareto_png(rows, front_params, front_time, best=..., cheapest=..., floor=..., best_tag=...) -> PNG bytes
    depth_png(layers, depth_of) -> PNG bytes
    loss_png({variant: [{step, loss}, ...]}) -> PNG bytes
    human(22713986) -> '22.7M'
"""
from __future__ import annotations

import io
import math
from typing import Sequence


def human(n: float) -> str:
    """12 -> '12', 74498 -> '74.5k', 22713986 -> '22.7M'."""
    n = float(n)
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            s = f"{n / div:.1f}".rstrip("0").rstrip(".")
            return s + suf
    return f"{n:.0f}"


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


def _scatter_panel(ax, rows, front, cost_key, *, log_x, xlabel, title, floor=None, ylabel="test quality"):
    on = [r for r in rows if r["variant"] in front]
    off = [r for r in rows if r["variant"] not in front]

    def cost(r):  # a log axis cannot show 0: clamp to 1
        return max(r[cost_key], 1) if log_x else r[cost_key]

    # each variant's 95% interval (bootstrap over test texts) as a vertical error bar
    ax.errorbar([cost(r) for r in rows], [r["quality"] for r in rows],
                yerr=[[r["quality"] - r["quality_ci"][0] for r in rows],
                      [r["quality_ci"][1] - r["quality"] for r in rows]],
                fmt="none", ecolor="#555555", elinewidth=1.1, capsize=4, zorder=2.5, label="95% interval")
    if off:
        ax.scatter([cost(r) for r in off], [r["quality"] for r in off], s=70, color="#9e9e9e",
                   edgecolor="black", linewidth=0.6, zorder=3, label="dominated")
    ax.scatter([cost(r) for r in on], [r["quality"] for r in on], s=110, marker="D", color="#d62728",
               edgecolor="black", linewidth=0.6, zorder=4, label="Pareto front")
    f_rows = sorted(on, key=lambda r: (cost(r), r["quality"]))
    xs, ys = [cost(r) for r in f_rows], [r["quality"] for r in f_rows]
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
    accs = [x for r in rows for x in r["quality_ci"]] + ([floor] if floor is not None else [])
    span = max(max(accs) - min(accs), 0.02)
    ax.set_ylim(min(accs) - 0.2 * span, max(accs) + 0.2 * span)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
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
    for r, c in points:
        x, y = ax.transData.transform((c, r["quality"]))
        obstacles.append(Bbox.from_extents(x - 6 * px, y - 6 * px, x + 6 * px, y + 6 * px))
        lo, hi = (ax.transData.transform((c, v))[1] for v in r["quality_ci"])
        # the error bar above and below the marker (split: a box holding the marker's own centre is ignored)
        obstacles += [Bbox.from_extents(x - 5 * px, y + 6.5 * px, x + 5 * px, max(hi, y + 7 * px)),
                      Bbox.from_extents(x - 5 * px, min(lo, y - 7 * px), x + 5 * px, y - 6.5 * px)]
    front_set = set(front)
    for r, x in sorted(points, key=lambda p: (p[0]["variant"] not in front_set, p[1])):
        tag = r["variant"] + (f" ({best_tag})" if r["variant"] == best else "") + \
              (" (cheapest)" if r["variant"] == cheap and cheap != best else "")
        near = _NEAR if r["variant"] in front_set else [_NEAR[1], _NEAR[0], *_NEAR[2:]]
        best_ann, best_score = None, None
        for i, (dx, dy, ha) in enumerate(near + _FAR):
            far = i >= len(near)
            ann = ax.annotate(tag, (x, r["quality"]), xytext=(dx, dy), textcoords="offset points",
                              ha=ha, va="bottom" if dy > 0 else "top" if dy < -12 else "center",
                              fontsize=9.5, zorder=5, annotation_clip=False,
                              bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
                              arrowprops={"arrowstyle": "-", "color": "#888888", "linewidth": 0.6,
                                          "shrinkA": 0, "shrinkB": 5} if far else None)
            ann.set_in_layout(False)
            box = ann.get_window_extent(renderer)
            own = Bbox.from_extents(*ax.transData.transform((x, r["quality"])) - 6 * px,
                                    *ax.transData.transform((x, r["quality"])) + 6 * px)
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


def pareto_png(rows: Sequence[dict], front_params: list, front_time: list, *, best: str, cheapest: str,
               quality: str, floor: float | None = None, best_tag: str = "best",
               lower_is_better: bool = False) -> bytes:
    """Left: quality vs trainable params (log x); right: quality vs train time. Fronts and
    95% intervals drawn; `floor` (best - tolerance) as a dotted line on the left panel.

    rows: {variant, quality, quality_ci: [low, high], trainable_params, train_time_s}; `quality` names the
    metric the rows' "quality" holds (accuracy; a causal LM's perplexity: lower is better).
    """
    ylabel = f"test {quality}" + (" (lower is better)" if lower_is_better else "")
    name = quality.capitalize()
    fig = _figure(12.5, 5.2)
    ax1, ax2 = fig.subplots(1, 2)
    p1 = _scatter_panel(ax1, rows, front_params, "trainable_params", log_x=True,
                        xlabel="trainable parameters (log scale)", title=f"{name} vs trainable parameters",
                        floor=floor, ylabel=ylabel)
    p2 = _scatter_panel(ax2, rows, front_time, "train_time_s", log_x=False,
                        xlabel="train time, optimizer loop (s)", title=f"{name} vs train time", ylabel=ylabel)
    fig.suptitle(f"depthtune: {len(rows)} variants, Pareto fronts ({quality} {'down' if lower_is_better else 'up'}, "
                 "cost down; bars: 95% interval)",
                 fontsize=12)
    fig.draw_without_rendering()  # run the layout so label extents are final-ish
    _label_points(ax1, p1, front_params, best=best, cheap=cheapest, best_tag=best_tag)
    _label_points(ax2, p2, front_time, best=best, best_tag=best_tag)
    return _png(fig)


def depth_png(layers: dict, depth_of: dict) -> bytes:
    """Heatmap: variants x layer buckets, colour = trainable params (log), each cell labelled.

    layers: {"layers": [names], "trainable": {variant: {layer: n}}}; depth_of: {variant: depth}.
    """
    import matplotlib
    import numpy as np
    from matplotlib.colors import LogNorm

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
    ax.set_yticks(range(len(variants)), [f"{v} (depth {depth_of[v]})" for v in variants], fontsize=9.5)
    ax.set_xticks(np.arange(-0.5, len(names)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(variants)), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    cb = fig.colorbar(im, ax=ax, pad=0.02)
    cb.set_label("trainable parameters (log scale)")
    ax.set_title("Trainable parameters per layer  (0 = frozen, — = layer not kept)", fontsize=11)
    return _png(fig)


def loss_png(curves: dict) -> bytes:
    """Training loss per optimizer step, one line per variant (the train records' loss_curve).

    curves: {variant: [{"step", "loss"}, ...]}; a variant with no points is named in the legend as such.
    Each step's loss is the mean over its micro-batches, so the raw line is noisy: it is drawn faint, with
    a running mean over ~1/20 of the steps (at least 1) on top, which is what a person reads.
    """
    import numpy as np

    fig = _figure(8.5, 4.4)
    ax = fig.subplots()
    colors = [f"C{i % 10}" for i in range(len(curves))]
    for (variant, points), color in zip(curves.items(), colors):
        pts = [(p["step"], p["loss"]) for p in points if p.get("loss") is not None]
        if not pts:
            ax.plot([], [], color=color, label=f"{variant} (no loss recorded)")
            continue
        steps, losses = (np.asarray(x, dtype=float) for x in zip(*pts))
        window = max(1, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")  # len(losses) - window + 1 points
        ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps[window - 1:], smooth, color=color, linewidth=1.8, label=variant)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss per variant (faint: per step; line: running mean)", fontsize=11)
    ax.grid(True, alpha=0.35)
    ax.legend(fontsize=9, framealpha=0.9)
    return _png(fig)
