"""How sure is a test metric, and is one variant really better than another?

Pure numpy/stdlib statistics over label ids (no torch, no sklearn), each metric computed by its one implementation
(depthtune.evaluation.metrics: accuracy, macro_f1, perplexity, bits_per_byte), used by the
evaluation stage (intervals), the comparison report and the registry (paired tests).

    bootstrap_ci(refs, preds, "accuracy")              -> (low, high), 95% percentile bootstrap over texts
    mcnemar(refs, pred_a, pred_b)                      -> two-sided p, exact binomial on discordant pairs
    paired_bootstrap(refs, pred_a, pred_b, "macro_f1") -> two-sided p, same resampled texts for both
    paired_test(refs, pred_a, pred_b, metric)          McNemar for accuracy, paired bootstrap for macro-F1
The bootstrap is ours, not scipy.stats.bootstrap: both draw the same resamples from the same generator (the same
intervals), but ours scores every resample of a macro-F1 in three matrix products (bench/library_choices.py, AMD EPYC:
3.4-72x faster for macro-F1, 0.8-1.7x for accuracy); McNemar is scipy.stats.binomtest.
    compare_to_best(refs, {name: preds}, metric, best) -> {name: p vs best} (None for the best itself)

Why: with 1,000 test texts at 80% accuracy one standard error is sqrt(.8*.2/1000) = 1.3
points, so a 0.4-point gap between two variants is noise unless a paired test says
otherwise. Paired tests use that both variants saw the SAME texts: only the texts where
they disagree carry information, which makes them far sharper than comparing intervals.

Every resampling is seeded (default seed 0): the same predictions always give the same
interval and the same p-value.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from depthtune.evaluation import metrics
from depthtune.evaluation.metrics import class_ids, label_ids

_CHUNK = 4_000_000  # resample weights held at once (resamples x texts): ~32 MB of float64


def _weighted(metric: str) -> Callable:
    m = metrics.get(metric)
    if m.weighted is None:
        raise ValueError(f"metric {metric!r} is not a function of label ids")
    return m.weighted


def _resample_weights(n_texts: int, n: int, seed: int):
    """Yield blocks of bootstrap weights (resamples x texts): how often each text was drawn.

    Drawing n x n_texts indices and counting them per row is a multinomial resample; blocks
    keep memory bounded for large test sets. The same seed gives the same blocks.
    """
    rng = np.random.default_rng(seed)
    per_block = max(1, _CHUNK // n_texts)
    for start in range(0, n, per_block):
        rows = min(per_block, n - start)
        idx = rng.integers(0, n_texts, size=(rows, n_texts)) + np.arange(rows)[:, None] * n_texts
        yield np.bincount(idx.ravel(), minlength=rows * n_texts).reshape(rows, n_texts).astype(np.float64)


# ----------------------------------------------------------------------------- one variant: the interval


def bootstrap_ci(references: Sequence[int], predictions: Sequence[int], metric: str, *, n: int = 1000,
                 seed: int = 0, level: float = 0.95, num_labels: Optional[int] = None) -> tuple[float, float]:
    """Percentile bootstrap interval of `metric` over test texts: resample the texts with
    replacement `n` times, score each resample, take the (1-level)/2 and (1+level)/2 quantiles."""
    r, p = label_ids(references, predictions)
    fn, classes = _weighted(metric), class_ids(r, [p], num_labels)
    stats = np.concatenate([fn(w, r, p, classes) for w in _resample_weights(len(r), n, seed)])
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


# ----------------------------------------------------------------------------- two variants: paired tests


def mcnemar(refs: Sequence[int], pred_a: Sequence[int], pred_b: Sequence[int]) -> float:
    """Two-sided exact McNemar p-value: is A's accuracy different from B's on the same texts?

    Only discordant texts count: b = A right and B wrong, c = A wrong and B right. Under "no difference" each
    discordant text is a fair coin, so p = the exact two-sided binomial test of b successes in b + c trials at 1/2
    (scipy.stats.binomtest; 1 when there is no discordant text). Exact at every count, so the chi-square
    approximation is never needed (bench/library_choices.py: the same p-values as the log-space sum it replaced, to
    1e-13; 1.1 ms at a million discordant texts where the sum took 158 ms).
    """
    from scipy.stats import binomtest

    r, a, b_ = label_ids(refs, pred_a, pred_b)
    right_a, right_b = a == r, b_ == r
    b, c = int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))
    if b + c == 0 or b == c:
        return 1.0
    return min(1.0, float(binomtest(b, b + c, 0.5).pvalue))


def paired_bootstrap(refs: Sequence[int], pred_a: Sequence[int], pred_b: Sequence[int], metric: str = "macro_f1",
                     n: int = 1000, seed: int = 0, num_labels: Optional[int] = None) -> float:
    """Two-sided paired bootstrap p-value for metric(A) != metric(B) on the same texts.

    Each resample draws the same texts for A and B; delta* = metric(A*) - metric(B*) then
    spreads around the observed delta d. Shifted to the null (centre 0), the p-value is the
    share of resamples at least as far from d as d is from 0: (1 + #|delta* - d| >= |d|) / (n + 1).
    Identical predictions: every delta* is 0 = d, p = 1.
    """
    r, a, b = label_ids(refs, pred_a, pred_b)
    fn, classes = _weighted(metric), class_ids(r, [a, b], num_labels)
    ones = np.ones((1, len(r)))
    d = float(fn(ones, r, a, classes)[0] - fn(ones, r, b, classes)[0])
    deltas = np.concatenate([fn(w, r, a, classes) - fn(w, r, b, classes) for w in _resample_weights(len(r), n, seed)])
    far = int(np.sum(np.abs(deltas - d) >= abs(d) - 1e-12))
    return min(1.0, (1 + far) / (n + 1))


def paired_test(refs: Sequence[int], pred_a: Sequence[int], pred_b: Sequence[int], metric: str, *,
                n: int = 1000, seed: int = 0, num_labels: Optional[int] = None) -> float:
    """The p-value of the metric's paired test (metrics.get(metric).paired_test): McNemar for accuracy, the paired
    bootstrap otherwise."""
    if metrics.get(metric).paired_test == "McNemar":
        return mcnemar(refs, pred_a, pred_b)
    _weighted(metric)  # a clear error for a metric of another kind
    return paired_bootstrap(refs, pred_a, pred_b, metric, n=n, seed=seed, num_labels=num_labels)


def compare_to_best(references: Sequence[int], predictions: Mapping[str, Sequence[int]], metric: str, best: str, *,
                    n: int = 1000, seed: int = 0, num_labels: Optional[int] = None) -> dict[str, Optional[float]]:
    """{variant: p-value of its paired test against `best`}, in `predictions` order; None for `best`."""
    if best not in predictions:
        raise ValueError(f"best variant {best!r} has no predictions")
    return {name: None if name == best else
            paired_test(references, predictions[best], preds, metric, n=n, seed=seed, num_labels=num_labels)
            for name, preds in predictions.items()}


# ----------------------------------------------------------------------------- language models: ratios of sums


def _lm_stat(metric: str, weights: np.ndarray, nll: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """The metric's ratio of weighted sums per weight row: perplexity exp(sum w*nll / sum w*tokens), bits per byte
    sum w*nll / ln 2 / sum w*bytes."""
    m = metrics.get(metric)
    if m.ratio is None:
        raise ValueError(f"metric {metric!r} is not a ratio of per-text sums")
    return m.ratio((weights @ nll) / np.maximum(weights @ denominator, 1.0))


def lm_bootstrap_ci(nll: Sequence[float], denominator: Sequence[float], metric: str, *, n: int = 1000,
                    seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of perplexity (denominator = tokens per text) or bits per byte
    (bytes per text) over test texts: the texts are resampled, the ratio of sums recomputed."""
    x, d = np.asarray(nll, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    stats = np.concatenate([_lm_stat(metric, w, x, d) for w in _resample_weights(len(x), n, seed)])
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def lm_paired_bootstrap(nll_a: Sequence[float], nll_b: Sequence[float], denominator: Sequence[float], metric: str, *,
                        n: int = 1000, seed: int = 0) -> float:
    """Two-sided paired bootstrap p-value for metric(A) != metric(B) on the same test texts (as paired_bootstrap)."""
    a, b = np.asarray(nll_a, dtype=np.float64), np.asarray(nll_b, dtype=np.float64)
    d_ = np.asarray(denominator, dtype=np.float64)
    if not len(a) == len(b) == len(d_):
        raise ValueError(f"paired texts differ: {len(a)}, {len(b)} and {len(d_)} values")
    ones = np.ones((1, len(a)))
    d = float(_lm_stat(metric, ones, a, d_)[0] - _lm_stat(metric, ones, b, d_)[0])
    deltas = np.concatenate([_lm_stat(metric, w, a, d_) - _lm_stat(metric, w, b, d_)
                             for w in _resample_weights(len(a), n, seed)])
    far = int(np.sum(np.abs(deltas - d) >= abs(d) - 1e-12))
    return min(1.0, (1 + far) / (n + 1))
