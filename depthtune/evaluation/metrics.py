"""The metrics, one registry: each metric's name, task, direction, display name, paired test and its one
implementation. Early stopping, the learning-rate search's gate, the evaluation record, the comparison report, the
tracking and the registry's promotion all read a metric here, never a literal of its own.

Two shapes of metric:
- classification metrics are functions of label ids (references, predictions). Each is written once, over bootstrap
  weights (resamples x texts: how often each text was drawn), so a plain score is the same function with every
  weight 1, and an interval or a paired test resamples it without a Python loop;
- language-model metrics are ratios of per-text sums: summed nll over a per-text count (`denominator`: predicted
  tokens for perplexity, UTF-8 bytes for bits per byte), so resampling texts recomputes the ratio exactly.

Which task reports which metric is the task's (depthtune.tasks: `metrics`, the headline first). Adding a metric: one
`Metric` row (and its weighted function or its ratio), a field in records.EvalRecord, the task's `metrics`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np


def class_ids(refs: np.ndarray, preds: Sequence[np.ndarray], num_labels: Optional[int]) -> np.ndarray:
    """The classes a macro average runs over.

    num_labels given: every class 0..num_labels-1, a class absent from both references and predictions scoring F1 0
    (sklearn with labels=range(num_labels), zero_division=0). None: the classes present in the references or any
    predictions (sklearn's default).
    """
    if num_labels is not None:
        return np.arange(num_labels)
    return np.unique(np.concatenate([refs, *preds]))


def weighted_accuracy(weights: np.ndarray, refs: np.ndarray, preds: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Accuracy of each row of `weights`: the weighted share of texts predicted right."""
    return weights @ (refs == preds).astype(np.float64) / weights.sum(axis=1)


def weighted_macro_f1(weights: np.ndarray, refs: np.ndarray, preds: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Macro-F1 of each row of `weights`.

    Per class c: F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (#true c + #predicted c); 0 when both are 0.
    Three matrix products give every resample's per-class counts at once.
    """
    is_ref = (refs[:, None] == classes[None, :]).astype(np.float64)  # texts x classes
    is_pred = (preds[:, None] == classes[None, :]).astype(np.float64)
    tp = weights @ (is_ref * is_pred)
    denom = weights @ is_ref + weights @ is_pred
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return f1.mean(axis=1)


def perplexity_of(ratio):
    """exp(nats per token), overflow-capped (exp(700) ~ 1e304); a float for a float, an array for an array."""
    return math.exp(min(ratio, 700.0)) if isinstance(ratio, float) else np.exp(np.minimum(ratio, 700.0))


def bits_of(ratio):
    """Nats per byte -> bits per byte."""
    return ratio / math.log(2)


def label_ids(*arrays: Sequence[int]) -> list[np.ndarray]:
    """Label-id sequences as int64 arrays of one length (a one-line ValueError otherwise)."""
    out = [np.asarray(a, dtype=np.int64).ravel() for a in arrays]
    if any(len(a) != len(out[0]) for a in out):
        raise ValueError(f"references and predictions differ in length: {[len(a) for a in out]}")
    if len(out[0]) == 0:
        raise ValueError("no texts to score")
    return out


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    display: str  # how tables and figures name it
    paired_test: str  # the test its paired p-values come from (depthtune.evaluation.significance)
    bounded: bool  # lies in 0..1: tolerances in its units are at most 1
    weighted: Optional[Callable] = None  # classification: (weights, refs, preds, classes) -> one score per row
    ratio: Optional[Callable] = None  # language model: summed nll / summed denominator -> the metric
    denominator: Optional[str] = None  # language model: the per-text count the nll is divided by (tokens | n_bytes)

    @property
    def sign(self) -> int:
        """+1 when higher is better, else -1: sign * (a - b) > 0 means a is better."""
        return 1 if self.higher_is_better else -1

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b

    def of_labels(self, refs: Sequence[int], preds: Sequence[int], num_labels: Optional[int] = None) -> float:
        """The score of predicted label ids (classification metrics)."""
        r, p = label_ids(refs, preds)
        return float(self.weighted(np.ones((1, len(r))), r, p, class_ids(r, [p], num_labels))[0])

    def of_sums(self, nll: float, denominator: float) -> float:
        """The score from summed nll and summed denominator (language-model metrics)."""
        return float(self.ratio(float(nll) / max(1.0, float(denominator))))


REGISTRY = {m.name: m for m in (
    Metric("accuracy", True, "accuracy", "McNemar", True, weighted=weighted_accuracy),
    Metric("macro_f1", True, "macro-F1", "paired bootstrap", True, weighted=weighted_macro_f1),
    Metric("perplexity", False, "perplexity", "paired bootstrap", False, ratio=perplexity_of,
           denominator="tokens"),
    Metric("bits_per_byte", False, "bits/byte", "paired bootstrap", False, ratio=bits_of,
           denominator="n_bytes"),
)}
NAMES = tuple(REGISTRY)
# the pretrain stage's held-out score (masked-LM or next-token): perplexity whatever the fine-tuning task
PRETRAIN = REGISTRY["perplexity"]


def accuracy(refs: Sequence[int], preds: Sequence[int], num_labels: Optional[int] = None) -> float:
    return REGISTRY["accuracy"].of_labels(refs, preds, num_labels)


def macro_f1(refs: Sequence[int], preds: Sequence[int], num_labels: Optional[int] = None) -> float:
    """Mean per-class F1 (num_labels: over every class id, absent ones 0; None: the classes present)."""
    return REGISTRY["macro_f1"].of_labels(refs, preds, num_labels)


def get(name: str) -> Metric:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"metric {name!r} is not one of {', '.join(NAMES)}") from None


def label_metrics() -> list[Metric]:
    """The classification metrics (functions of label ids)."""
    return [m for m in REGISTRY.values() if m.weighted is not None]


def ratio_metrics() -> list[Metric]:
    """The language-model metrics (ratios of per-text sums)."""
    return [m for m in REGISTRY.values() if m.ratio is not None]


def lm_metrics(nll: np.ndarray, tokens: np.ndarray, n_bytes: Optional[np.ndarray] = None) -> dict:
    """{loss, every ratio metric whose per-text count is known (perplexity; bits_per_byte with bytes), tokens} of
    per-text sums (depthtune.evaluation.metrics: one implementation each)."""
    total_nll, total_tokens = float(np.sum(nll)), int(np.sum(tokens))
    sums = {"tokens": total_tokens, **({"n_bytes": int(np.sum(n_bytes))} if n_bytes is not None else {})}
    out = {"loss": total_nll / max(1, total_tokens)}
    out.update({m.name: m.of_sums(total_nll, sums[m.denominator]) for m in ratio_metrics()
                if m.denominator in sums})
    return {**out, "tokens": total_tokens}


def higher_is_better(name: str) -> bool:
    return get(name).higher_is_better
